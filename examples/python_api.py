"""The Python API: records in memory in, a run folder with a PEFT adapter out (tests/test_python_api.py runs this)."""
from mezo_vllm import TuneConfig, tune

reviews = {"a gripping, funny and generous film": 1, "dull, slow and far too long": 0,
           "the cast is wonderful from start to end": 1, "I walked out after an hour": 0,
           "a small miracle of a movie": 1, "the plot makes no sense at all": 0,
           "warm, clever and beautifully shot": 1, "a tired remake with nothing new": 0}
data = [{"prompt": f"Review: {text}. It was", "options": [" terrible", " great"], "label": label}
        for text, label in reviews.items()]
cfg = TuneConfig(out="runs/python-api", steps=3, batch_size=4, eval_split=0.5)  # or data="train.jsonl"
summary = tune(cfg, data=data)  # eval_data=[...] for dev records of your own
print(f"dev accuracy {summary['before']['accuracy']} -> {summary['after']['accuracy']}; adapter in {summary['run']}/adapter")
