"""The marked MLflow model (``runs:/<id>/faces``): z in, uint8 faces out, each carrying the
provenance mark (evaluation/watermark.py) with the run's source id.

Logged beside the raw tensor model (``runs:/<id>/generator``, unmarked) by jobs/publish.py as a
pyfunc whose loader is this module of the installed facegan package: the model folder holds only
data (the generator's weights, read with ``weights_only``, and a JSON file), so loading it runs
no code from the model, the same guarantee as the exported pt2 generator.

    import mlflow
    faces = mlflow.pyfunc.load_model("runs:/<id>/faces").predict(z)   # (n, S, S, 3) uint8, marked
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from evaluation.watermark import Watermark
from gan.config import ModelConfig
from gan.images import to_uint8
from gan.models import generator

NAME = "faces"
WEIGHTS, META = "generator.pt", "marked.json"


def save_data(folder: Path, G: torch.nn.Module, model_cfg: ModelConfig, source_id: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in G.state_dict().items()}, folder / WEIGHTS)
    (folder / META).write_text(json.dumps({"model": dataclasses.asdict(model_cfg), "source_id": source_id}))


class MarkedFaces:
    def __init__(self, folder: str):
        meta = json.loads((Path(folder) / META).read_text())
        self.G = generator(ModelConfig(**meta["model"]))
        self.G.load_state_dict(torch.load(Path(folder) / WEIGHTS, map_location="cpu", weights_only=True))
        self.G.eval()
        self.source_id, self.mark = meta["source_id"], Watermark()

    @torch.no_grad()
    def predict(self, model_input, params=None) -> np.ndarray:
        z = torch.as_tensor(np.asarray(model_input, np.float32))
        return self.mark.mark(to_uint8(self.G(z)), self.source_id)


def _load_pyfunc(data_path: str) -> MarkedFaces:
    """MLflow's entry point for a ``loader_module`` pyfunc."""
    return MarkedFaces(data_path)
