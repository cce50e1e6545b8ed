import os

# Tests never reach a real Hub account.
os.environ["HF_TOKEN"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
