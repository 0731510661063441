"""Checkpoint formats and downloads: the seed's MindSpore ``.ckpt`` files (:mod:`.mindspore`, names in
:mod:`.mindspore_names`) and Meta's released weights (:mod:`.download`). Loading into a model is
:func:`samkit.build.load_checkpoint`."""
