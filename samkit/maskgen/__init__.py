"""The torch-free core of automatic mask generation, shared by :class:`samkit.SamAutomaticMaskGenerator`
and :class:`samkit.onnx.OnnxAutomaticMaskGenerator`: point grids, crop boxes and argument checks
(:mod:`.grids`), non-maximum suppression (:mod:`.nms`) and RLE encoding and decoding (:mod:`.rle`)."""
