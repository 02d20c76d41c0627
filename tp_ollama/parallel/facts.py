"""What one rank reports about itself for the cluster endpoints: where it runs and the memory it uses."""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil
import torch


def rank_facts(rank: int, device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    memory = psutil.virtual_memory()
    facts: dict[str, Any] = {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "rss_bytes": psutil.Process().memory_info().rss,
        "mem_total_bytes": memory.total,
        "mem_available_bytes": memory.available,
        "device_mem_used_bytes": 0,
        "device_mem_total_bytes": 0,
        "alive": True,
    }
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        facts["device_mem_used_bytes"] = total - free
        facts["device_mem_total_bytes"] = total
    return facts
