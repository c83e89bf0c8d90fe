"""One recipe file per training method, each registered once (``tuneforge.recipes.registry``); the trainer
(``tuneforge.engine.trainer``) runs the recipe ``config.method`` names. Modules starting with ``_`` are parts that
several recipes compose, not methods."""
