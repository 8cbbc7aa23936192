"""Data layer: webdataset shards in and out, transforms, caption cleaning, COCO/Flickr sets, the demo world.

One module per concept: `text` (pre_caption), `transforms`, `shards` (read/write tars, bad-sample accounting),
`loader` (the training input pipeline), `datasets` (evaluation sets and training pairs), `demo` (the synthetic
world), `shard_stats` (inspect a shard set; also as `blip.data.stats`). Import the submodules directly; this
package imports nothing heavy on its own.
"""


def __getattr__(name: str):
    """`blip.data.stats(shards)` (blip.data.shard_stats.stats), imported on first use so the package stays light."""
    if name == "stats":
        from blip.data.shard_stats import stats

        return stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
