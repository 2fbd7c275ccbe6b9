"""KD-FedLLM: knowledge distillation through logits on a public dataset (arXiv 2501.04436).

A public set (``public_samples`` examples carved from the training split before partitioning, so
it is disjoint from every client's shard; or another data config, ``public_data``) is shared by all.

What crosses the wire, per round, per participating client:
  down: the aggregated knowledge from the previous round (teacher probabilities at ``temperature``
        on the public set: full, or ``logit_topk`` values + int32 indices per position), and/or the
        global adapter (``downlink``: ``logits`` as in the paper, ``adapter`` or ``both``).
  up:   the client's logits on the public set after its local update: class logits for
        classification heads (small), next-token logits at every response position otherwise
        (vocab-sized: large, unless ``logit_topk``), + ``num_examples``.
Server: converts each upload to probabilities at ``temperature``, averages them (example-weighted or
uniform), and distils them into the global model with ``server_kd_steps`` steps of
T^2 * KL(teacher || student). Clients add ``kd_weight`` x the same KD loss on a public batch to
every local step of the next round (``train/loss`` logs the task loss alone, ``train/kd_loss`` the
KD term; client FLOPs count the KD term's forward and backward over its public batch every step). With ``downlink=logits`` each client keeps its own adapter
across rounds (only knowledge travels); the evaluated model is the server's distilled one.
"""

from __future__ import annotations

import random
from typing import Any, cast

import torch
import torch.nn.functional as F

from fedtune.client.runtime import ClientContext
from fedtune.comm.channel import Message
from fedtune.config import CONF_DIR
from fedtune.data.format import IGNORE_INDEX, collate
from fedtune.data.schema import Splits
from fedtune.data.tasks import tokenize_like
from fedtune.errors import ConfigError
from fedtune.models.lora import State
from fedtune.seeding import Purpose, generator
from fedtune.strategies.aggregate import client_weights
from fedtune.strategies.base import ServerContext, Strategy, check_weighting
from fedtune.train.local import Loss, batch_order, compute_params

DOWNLINKS = ("logits", "adapter", "both")


def _rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits the loss sees: class logits (B, C), or next-token logits at response positions (N, V)."""
    if labels.dim() == 1:
        return logits
    return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]


class KD(Strategy):
    def __init__(
        self,
        *,
        public_samples: int = 200,
        public_data: str | None = None,
        public_path: str | None = None,
        temperature: float = 2.0,
        kd_weight: float = 0.5,
        server_kd_steps: int = 20,
        logit_topk: int | None = None,
        downlink: str = "logits",
        weighting: str = "examples",
    ) -> None:
        if public_samples < 1:
            raise ConfigError(f"strategy.public_samples={public_samples}: must be >= 1")
        if temperature <= 0:
            raise ConfigError(f"strategy.temperature={temperature}: must be > 0")
        if downlink not in DOWNLINKS:
            raise ConfigError(f"strategy.downlink={downlink}: choose one of {', '.join(DOWNLINKS)}")
        if logit_topk is not None and logit_topk < 1:
            raise ConfigError(f"strategy.logit_topk={logit_topk}: must be >= 1 (or null for full logits)")
        if public_data is not None and not (CONF_DIR / "data" / f"{public_data}.yaml").exists():
            raise ConfigError(f"strategy.public_data={public_data}: no conf/data/{public_data}.yaml; "
                              "use null (carve from the training split) or a data config name")
        self.public_samples, self.public_data, self.public_path = int(public_samples), public_data, public_path
        self.temperature, self.kd_weight = float(temperature), float(kd_weight)
        self.server_kd_steps, self.logit_topk = int(server_kd_steps), logit_topk
        self.downlink, self.weighting = downlink, check_weighting(weighting)
        self.teacher: torch.Tensor | None = None  # aggregated probabilities, rows aligned with the public set
        self.public_examples: list[dict] = []

    # ---- data: the public set, disjoint from every shard
    def prepare_splits(self, splits: Splits, *, seed: int) -> Splits:
        rng = random.Random(seed * 7919 + 17)
        if self.public_data is None:
            if self.public_samples >= len(splits.train):
                raise ConfigError(f"strategy.public_samples={self.public_samples}: the training split has only "
                                  f"{len(splits.train)} examples; lower it")
            chosen = set(rng.sample(range(len(splits.train)), self.public_samples))
            self.public_examples = [ex for i, ex in enumerate(splits.train) if i in chosen]
            splits.train = [ex for i, ex in enumerate(splits.train) if i not in chosen]
            return splits
        from omegaconf import OmegaConf

        from fedtune.data.sources import load_splits

        node = OmegaConf.load(CONF_DIR / "data" / f"{self.public_data}.yaml")
        node.path = self.public_path
        public = load_splits(OmegaConf.create({"data": node}).data).train
        if public and splits.label_names is not None and public[0].get("label") is not None:
            assert splits.task == "classify"
        self.public_examples = rng.sample(public, min(self.public_samples, len(public)))
        return splits

    def setup(self, *, initial_state: State, num_clients: int, server: ServerContext | None = None) -> None:
        super().setup(initial_state=initial_state, num_clients=num_clients, server=server)
        self.initial_state = initial_state
        if server is not None:
            self.public, _ = tokenize_like(server.task, self.public_examples, server.tokenizer,
                                           max_seq_len=server.local.max_seq_len)

    # ---- knowledge <-> tensors
    def _probs(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Uploaded logits (full or top-k) as probabilities at the temperature, dense (rows, classes)."""
        if "topk_values" not in tensors:
            return F.softmax(tensors["logits"].float() / self.temperature, dim=-1)
        values, idx = tensors["topk_values"].float(), tensors["topk_indices"].long()
        dense = torch.zeros(values.shape[0], int(tensors["num_classes"].item()))
        return dense.scatter_(1, idx, F.softmax(values / self.temperature, dim=-1))

    def _knowledge(self) -> dict[str, torch.Tensor]:
        assert self.teacher is not None
        if self.logit_topk is None or self.logit_topk >= self.teacher.shape[1]:
            return {"probs": self.teacher}
        values, idx = self.teacher.topk(self.logit_topk, dim=-1)
        return {"topk_probs": values / values.sum(-1, keepdim=True), "topk_indices": idx.to(torch.int32),
                "num_classes": torch.tensor([self.teacher.shape[1]])}

    @staticmethod
    def _teacher_from(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if "probs" in tensors:
            return tensors["probs"]
        if "topk_probs" in tensors:
            dense = torch.zeros(tensors["topk_probs"].shape[0], int(tensors["num_classes"].item()))
            return dense.scatter_(1, tensors["topk_indices"].long(), tensors["topk_probs"])
        return None

    def _kd_loss(self, model, batch, idx, teacher: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        rows = _rows(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
        target = torch.cat([teacher[offsets[i]:offsets[i + 1]] for i in idx]).to(rows.device)
        log_student = F.log_softmax(rows.float() / self.temperature, dim=-1)
        return F.kl_div(log_student, target, reduction="batchmean") * self.temperature**2

    def _offsets(self) -> list[int]:
        """Row ranges of each public example in the flattened teacher (1 row per example for heads)."""
        out = [0]
        for labels in self.public.labels:
            out.append(out[-1] + (1 if labels.dim() == 0 else int((labels[1:] != IGNORE_INDEX).sum())))
        return out

    # ---- the hooks
    def broadcast(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        tensors: dict[str, torch.Tensor] = {}
        if self.teacher is not None and self.downlink in ("logits", "both"):
            tensors.update(self._knowledge())
        if self.downlink in ("adapter", "both"):
            tensors.update({f"adapter.{k}": v for k, v in self.global_state.items()})
        return {cid: Message(tensors=tensors) for cid in client_ids}

    def local_update(self, client: ClientContext, message: Message) -> Message:
        rt = client.runtime
        adapter = {k.removeprefix("adapter."): v for k, v in message.tensors.items() if k.startswith("adapter.")}
        client.set_trainable(adapter or client.state.get("trainable", self.initial_state))
        teacher, offsets = self._teacher_from(message.tensors), self._offsets()
        loss_fn, kd_tokens = None, [0]
        if teacher is not None and self.kd_weight > 0:
            stream = batch_order(list(range(len(self.public))), batch_size=rt.local.batch_size, num_steps=10**9,
                                 generator=generator(rt.seed, client.round_idx, client.client_id, Purpose.KD_PUBLIC))

            def loss_fn(model, batch, idx):
                pub_idx = next(stream)
                pub = {k: v.to(rt.device) for k, v in collate(self.public, pub_idx, pad_id=rt.pad_id).items()}
                kd_tokens[0] += int(pub["attention_mask"].sum())
                kd = self._kd_loss(model, pub, pub_idx, teacher, offsets)
                task = model(**batch).loss
                # train/loss is the task loss alone (comparable across strategies); the KD term: train/kd_loss
                return Loss(objective=task + self.kd_weight * kd, task=task.detach(), terms={"kd_loss": kd.detach()})

        result = client.train(loss_fn=loss_fn)
        if self.downlink == "logits":
            client.state["trainable"] = client.get_trainable()
        logits, tokens = self._public_logits(client.model, rt.local.batch_size, rt.pad_id, rt.device)
        params = compute_params(client.model)
        # the KD term: a forward AND backward over one public batch every step; then the upload's forward
        result.flops += 6.0 * params * kd_tokens[0] + 2.0 * params * tokens
        return Message(tensors=self._upload(logits), meta={"num_examples": result.num_examples})

    @torch.no_grad()
    def _public_logits(self, model, batch_size, pad_id, device) -> tuple[torch.Tensor, int]:
        model.eval()
        rows, tokens = [], 0
        for start in range(0, len(self.public), batch_size):
            batch = collate(self.public, list(range(start, min(start + batch_size, len(self.public)))), pad_id=pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            rows.append(_rows(out, batch["labels"]).float().cpu())
            tokens += int(batch["attention_mask"].sum())
        return torch.cat(rows), tokens

    def _upload(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.logit_topk is None or self.logit_topk >= logits.shape[1]:
            return {"logits": logits}
        values, idx = logits.topk(self.logit_topk, dim=-1)
        return {"topk_values": values, "topk_indices": idx.to(torch.int32),
                "num_classes": torch.tensor([logits.shape[1]])}

    def aggregate(self, round_idx: int, messages: dict[int, Message]) -> dict[str, float]:
        replies = list(messages.values())
        weights = client_weights([m.meta["num_examples"] for m in replies], weighting=self.weighting)
        total = sum(weights)
        # a sum over >= 1 replies: 0 + a tensor is a tensor
        self.teacher = cast(torch.Tensor,
                            sum(self._probs(m.tensors) * (w / total) for m, w in zip(replies, weights)))
        return {"train/server_kd_loss": self._distill(round_idx)} if self.server_kd_steps else {}

    def _distill(self, round_idx: int) -> float:
        """server_kd_steps of KD from the aggregated teacher into the global model (on the server's model)."""
        assert self.server is not None and self.teacher is not None
        teacher, offsets = self.teacher, self._offsets()
        self.global_state, result = self.server.train(
            self.global_state, lambda m, b, idx: self._kd_loss(m, b, idx, teacher, offsets), data=self.public,
            steps=self.server_kd_steps, round_idx=round_idx, stream=Purpose.SERVER)
        return result.loss

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state, "teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state, self.teacher = state["global_state"], state["teacher"]
