"""Export for deployment: ONNX files of the image encoder and the prompt decoder (:mod:`.onnx`) and their
verification against PyTorch (:mod:`.verify`)."""
