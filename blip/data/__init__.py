"""Data layer: webdataset shards in and out, transforms, caption cleaning, COCO/Flickr sets, the demo world.

One module per concept: `text` (pre_caption), `transforms`, `shards` (read/write tars, bad-sample accounting),
`loader` (the training input pipeline), `datasets` (evaluation sets and training pairs), `demo` (the synthetic
world). Import the submodules directly; this package imports nothing heavy on its own.
"""
