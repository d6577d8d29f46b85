"""`--deep`: CLIP scores over time, from weights already in the local Hugging Face cache (never downloaded).

- `clip_text`: cosine similarity of each sampled frame's CLIP image embedding with the prompt's text embedding
  (semantic consistency with the prompt; VBench's overall_consistency does this with ViCLIP).
- `subject_consistency`: cosine similarity of each sampled frame's CLIP image embedding with the first
  frame's (VBench's subject_consistency does this with DINO features).

Frames are sampled at SAMPLE_FPS per second and preprocessed as CLIP's image processor does (shorter side
resized to the model's input size, centre crop, OpenAI CLIP mean and std).
"""

from __future__ import annotations

import numpy as np

from pfgen.errors import PfgenError

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEEP_WORSE = {"clip_text": -1, "subject_consistency": -1}
SAMPLE_FPS = 2.0
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # OpenAI CLIP's normalisation
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class FrameSampler:
    """Keeps SAMPLE_FPS frames per second of a video, already cropped to the model's input size."""

    def __init__(self, fps: float, size: int):
        self.step = max(1, round(fps / SAMPLE_FPS))
        self.size = size
        self.index = 0
        self.frames: list[np.ndarray] = []
        self.indices: list[int] = []

    def add(self, rgb: np.ndarray) -> None:
        if self.index % self.step == 0:
            self.frames.append(_crop(rgb, self.size))
            self.indices.append(self.index)
        self.index += 1


def _crop(rgb: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    resized = cv2.resize(rgb, (max(size, round(w * scale)), max(size, round(h * scale))),
                         interpolation=cv2.INTER_CUBIC)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top:top + size, left:left + size]


class ClipScorer:
    """A CLIP model and tokenizer loaded with local_files_only=True."""

    def __init__(self, model_id: str = DEFAULT_CLIP):
        from pathlib import Path

        from transformers import AutoTokenizer, CLIPModel
        from transformers.utils import logging

        logging.set_verbosity_error()  # no load-report noise on the console: the weights are checked below
        logging.disable_progress_bar()
        try:
            self.model = CLIPModel.from_pretrained(model_id, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        except (OSError, ValueError):
            if Path(model_id).expanduser().exists():
                raise PfgenError(f"--deep: {model_id} is not a CLIP model folder",
                                 "give a folder written by CLIPModel.save_pretrained, with its tokenizer") from None
            raise PfgenError(f"--deep: no CLIP weights for {model_id} in the local Hugging Face cache",
                             f"run `hf download {model_id}` first, or give --clip-model a local folder") from None
        self.size = int(self.model.config.vision_config.image_size)

    def sampler(self, fps: float) -> FrameSampler:
        return FrameSampler(fps, self.size)

    def _embed(self, output):
        """transformers 4 returns the projected embedding, 5 an output whose pooler_output holds it."""
        import torch

        embedding = output if isinstance(output, torch.Tensor) else output.pooler_output
        return embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def image_embeddings(self, frames: list[np.ndarray], batch: int = 32):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), batch):
                x = (np.stack(frames[i:i + batch]).astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
                pixels = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
                out.append(self._embed(self.model.get_image_features(pixel_values=pixels)))
        return torch.cat(out)

    def text_embedding(self, prompt: str):
        import torch

        tokens = self.tokenizer([prompt], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings,
                                return_tensors="pt")
        with torch.inference_mode():
            return self._embed(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"]))[0]

    def frame_scores(self, sampler: FrameSampler, prompt: str | None) -> dict[str, np.ndarray]:
        """Per sampled frame: `subject_consistency` and (with a prompt) `clip_text`."""
        images = self.image_embeddings(sampler.frames)
        scores = {"subject_consistency": (images @ images[0]).numpy().astype(np.float64)}
        if prompt is not None:
            scores["clip_text"] = (images @ self.text_embedding(prompt)).numpy().astype(np.float64)
        return scores


def add_deep_windows(windows: list[dict], indices: list[int], scores: dict[str, np.ndarray], fps: float) -> None:
    """Adds each deep score's mean over the window's sampled frames to every window (None where absent)."""
    positions = np.asarray(indices)
    for window in windows:
        start, end = round(window["start_s"] * fps), round(window["end_s"] * fps)
        inside = (positions >= start) & (positions < end)
        for name in DEEP_WORSE:
            values = scores.get(name)
            window[name] = float(values[inside].mean()) if values is not None and inside.any() else None
