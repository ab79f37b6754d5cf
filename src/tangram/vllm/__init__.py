"""vLLM as an engine backend on Tangram's pool (docs/vllm.md).

A vLLM-backed instance is a vLLM engine in its own process (a *shell*, run by
the interpreter that has vLLM), fed its weights from the device pool: the
parent maps nothing new; the shell maps the pool's shared arena and loads
vLLM's parameters from the tensors there through the `tangram` model loader
that `plugin.py` registers with vLLM. A stopped instance's shell stays warm
and is re-bound to the next model of the same shape. Only `plugin.py`,
`loader.py` and `shell_main.py` import vLLM, and only in the shell.
"""
