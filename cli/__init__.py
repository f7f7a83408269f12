"""The `dynedit` command line: click commands only, a thin layer over onnx_dynedit."""
