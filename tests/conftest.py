import os
import socket
import tempfile

# Every test runs offline: nothing may be fetched from the Hub or any URL.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Caches the tests create (the digits classifier) go to a throw-away folder, not the user's ~/.cache.
os.environ.setdefault("DIFFUSERS_MASKED_CACHE", tempfile.mkdtemp(prefix="diffusers-masked-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models are dominated by thread synchronisation; one thread is faster and makes timings steadier.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_network(monkeypatch):
    """Any network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
