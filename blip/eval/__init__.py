"""Evaluation as in the paper: image-text retrieval recall (`retrieval`) and COCO caption metrics (`caption`).

Import the submodules directly; this package imports nothing heavy on its own.
"""
