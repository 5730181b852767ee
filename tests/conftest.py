"""Test setup: offline hubs, temporary caches, small thread count. Set before anything imports them."""

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="parti-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_tmp, "hf")
os.environ["PARTI_HOME"] = os.path.join(_tmp, "parti")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
