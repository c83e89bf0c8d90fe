"""tuneforge from Python, in notebook cells (each `# %%` is one; run it as a script, or open it in Jupyter or
VS Code as a notebook).

Trains the embedded SmolLM2-135M-Instruct (`model="default"`: nothing to download) on a handful of rows held in
memory, looks at the run, answers with it, evaluates it, then goes on from it with DPO. A minute or two on 2 CPU
cores:

    python examples/quickstart.py
"""

# %% Rows are plain dicts, as in a JSONL file (a datasets.Dataset works the same way).
import tuneforge as tf

FACTS = [("Velmora", "the river Asch"), ("Quillon", "salt and glass"), ("Brennick", "its night market"),
         ("Ostrava Minor", "a clock with no hands"), ("Tessaly", "white-roofed houses"),
         ("Harrowgate", "the long bridge")]
rows = [{"messages": [{"role": "user", "content": f"What is {city} known for?"},
                      {"role": "assistant", "content": f"{city} is known for {fact}."}]}
        for city, fact in FACTS]

# %% Train a LoRA adapter for a few steps (the progress bar is a widget in a notebook).
run = tf.train("sft", model="default", data=rows, output_dir="runs/quickstart-sft", overwrite=True,
               lora={"r": 16}, train={"max_steps": 6, "batch_size": 3, "lr": 1e-3, "warmup_steps": 0})

# %% What the run directory holds: summary.json and metrics.jsonl, as dicts.
print(run)
print({key: run.summary[key] for key in ("steps", "tokens", "train_loss", "stop_reason")})
print([round(record["loss"], 3) for record in run.metrics if "loss" in record])

# %% Answer with the trained model (the run's own chat template); a list of conversations gives a list.
print(run.generate([{"role": "user", "content": "What is Velmora known for?"}], max_new_tokens=16))

# %% The model itself: a transformers model with its PEFT adapter, ready for anything else.
model, tokenizer = run.load()
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")

# %% Evaluate on rows: the same metrics `tuneforge eval` writes to eval.json (here RUN_DIR/eval.json).
report = tf.evaluate(run, data=rows[:3], max_new_tokens=16, log=None)
print({name: round(value, 3) for name, value in report["metrics"][run.path.name].items()
       if isinstance(value, float)})

# %% A run is a model wherever a model is accepted: go on from it with DPO on preference pairs.
pairs = [{"prompt": f"What is {city} known for?", "chosen": f"{city} is known for {fact}.",
          "rejected": f"I am not sure, but maybe {city} is known for something or other."}
         for city, fact in FACTS]
aligned = tf.train("dpo", model=run, data=pairs, output_dir="runs/quickstart-dpo", overwrite=True,
                   train={"max_steps": 3, "batch_size": 3, "lr": 5e-4, "warmup_steps": 0})
print("DPO reward accuracy by step:", [record["reward_accuracy"] for record in aligned.metrics if "loss" in record])

# %% Bad rows fail before anything loads, naming the source, the row (its list index) and the field.
try:
    tf.train("sft", model="default", data=rows + [{"messages": [{"role": "user", "content": "Hi"}]}])
except tf.DataError as error:
    print("DataError:", error)
