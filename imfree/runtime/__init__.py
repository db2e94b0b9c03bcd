"""Tagging images with an export folder: inputs, decoding, engines, output rows.

Nothing here imports torch, open_clip, the toolkit or the export code: a
deployment needs numpy, Pillow, onnxruntime and tqdm (TensorRT optionally).
"""
