"""Host-side converters: a protected PyTorch classifier → ONNX (mask baked), TensorRT engine, signed bundle.

They take a plain `nn.Module` plus a `ModelDescription`; they never import `edgeguard`, so any vendor
classifier can go through them.
"""
