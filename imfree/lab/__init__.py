"""The vision-language lab: a small rendered world in which the whole method runs on a CPU.

A scene renderer, captions, a small CLIP trained on them, an LLM-style
knowledge corpus, and the ablation table measured with the product's own
commands (`python -m imfree.lab`, `make demo-lab`).
"""
