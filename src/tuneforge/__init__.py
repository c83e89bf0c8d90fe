"""tuneforge: post-training for causal language models.

The Python API (``import tuneforge as tf``; guide: docs/python_api.md)::

    run = tf.train("sft", model="default", data=rows, lora={"r": 16}, train={"max_steps": 60})
    run.summary, run.metrics
    model, tokenizer = run.load()
    run.generate([{"role": "user", "content": "Hi"}])
    tf.evaluate(run, data=heldout_rows)
    tf.train("dpo", model=run, data=pairs)
    run.push("me/my-model")

Importing it is light: torch and transformers load when a function first needs them.
"""

from tuneforge.api import Run, evaluate, generate, load, push, train
from tuneforge.errors import ConfigError, DataError, ModelSourceError, TemplateError, UserError

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "load", "generate", "push", "Run", "UserError", "ConfigError", "DataError",
           "ModelSourceError", "TemplateError", "__version__"]
