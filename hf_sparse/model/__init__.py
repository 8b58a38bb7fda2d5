"""The shipped model: every file here is copied next to `config.json` in each checkpoint
and runs as Hugging Face remote code (`trust_remote_code=True`) where hf_sparse is not
installed. transformers copies a modeling file and its same-folder relative imports flat,
so the rule is: files in this folder import only the standard library, torch,
transformers (and its huggingface_hub) and each other, as `from .module import name`.
tests/test_layout.py enforces it. This file is not copied and stays empty of code.
"""
