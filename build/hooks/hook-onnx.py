"""onnx: the model checker and helpers the repository uses. The reference evaluator and
the backend test harness are large and never used when serving."""

hiddenimports = ["onnx.onnx_cpp2py_export"]
excludedimports = ["onnx.reference", "onnx.backend", "onnx.tools"]
