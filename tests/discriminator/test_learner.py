"""The discriminator learner on 2 CPU ranks (gloo): scores, a BT step on FSDP2 and on DeepSpeed
against a single-process reference, save -> load -> next step, HF export reload, bad input."""

import math
import shutil
import sys

import pytest
import ray
import torch
from transformers import AutoTokenizer

from gad_ray.algorithms import bt_loss
from gad_ray.discriminator import DiscriminatorGroup, DiscriminatorModel
from gad_ray.models.loading import ModelLoadError, load_tokenizer
from tests.config_builder import learner_config, make_config
from tests.driver.helpers import max_rel_diff
from tests.learner.conftest import make_token_batch

PAIRS = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 teacher rows, 2 student samples each

# the in-worker row counter below lives in this test module: ship it to the actors by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def init_dir(tiny_model_dir, tmp_path_factory):
    """A discriminator (student backbone + seeded head) saved once: both sides start from it."""
    out = tmp_path_factory.mktemp("disc-init")
    model = DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=1)
    model.save_pretrained(str(out), load_tokenizer(str(tiny_model_dir)))
    return out


def disc_cfg(tiny_model_dir, path, **learner):
    return make_config(
        base=learner_config(tiny_model_dir, discriminator_ranks=2, **learner),
        model__discriminator__path=str(path),
        algorithm__discriminator_optim={"lr": 1e-2, "grad_clip": 1.0, "weight_decay": 0.01},
    )


class ReferenceBT:
    """The BT step in one process on the whole batch: plain torch + AdamW."""

    def __init__(self, path, cfg):
        self.model = DiscriminatorModel.from_pretrained(str(path))
        o = cfg.algorithm.discriminator_optim
        self.clip = o.grad_clip
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )

    def scores(self, b):
        return self.model(b.input_ids, b.attention_mask, b.response_mask)

    def step(self, teacher, student, pairs):
        loss, metrics = bt_loss(self.scores(teacher)[pairs], self.scores(student))
        loss.backward()
        metrics["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        )
        self.opt.step()
        self.opt.zero_grad()
        return metrics


def batches(seed):
    return make_token_batch(seed=seed, n=3), make_token_batch(seed=seed + 1, n=6)


def assert_close(got, want, tol=2e-5):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=tol, abs=tol), f"{k}: {got[k]} != {v}"


def check_step_matches_reference(group, ref, seed):
    teacher, student = batches(seed)
    with torch.no_grad():
        torch.testing.assert_close(group.score(student), ref.scores(student), rtol=1e-5, atol=1e-5)
    want = ref.step(teacher, student, PAIRS)
    got = group.train_bt(teacher, student, PAIRS)
    assert set(got) >= {"d_loss", "d_acc", "teacher_score_mean", "student_score_mean", "lr"}
    assert got["lr"] == 1e-2 and got["tokens_per_s"] > 0 and math.isfinite(got["grad_norm"])
    assert_close(got, want)
    with torch.no_grad():  # the updated weights agree: scores moved the same way
        for b in (teacher, student):
            torch.testing.assert_close(group.score(b), ref.scores(b), rtol=1e-4, atol=1e-4)


def test_bt_steps_fsdp_then_deepspeed_from_export(ray_session, tiny_model_dir, init_dir, tmp_path):
    """FSDP2: BT step vs reference, save -> load -> next step, HF export; then a DeepSpeed ZeRO-3
    group loaded from that export scores identically and its BT step matches the reference."""
    group = DiscriminatorGroup(disc_cfg(tiny_model_dir, init_dir))
    try:
        check_step_matches_reference(group, ReferenceBT(init_dir, group.cfg), seed=10)

        group.save_checkpoint(str(tmp_path / "ckpt"))
        teacher, student = batches(20)
        first = group.train_bt(teacher, student, PAIRS)
        after = group.score(student)
        group.load_checkpoint(str(tmp_path / "ckpt"))
        again = group.train_bt(teacher, student, PAIRS)
        assert_close(again, {k: first[k] for k in ("d_loss", "d_acc", "grad_norm")}, tol=1e-6)
        torch.testing.assert_close(group.score(student), after, rtol=1e-6, atol=1e-6)

        empty = make_token_batch(seed=1, n=2)
        empty.response_mask[1] = 0
        with pytest.raises(ValueError, match=r"student: .*rows \[1\].*no response tokens"):
            group.train_bt(teacher, empty, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"batch: .*rows \[1\].*no response tokens"):
            group.score(empty)
        with pytest.raises(ValueError, match="pair_teacher_index"):
            group.train_bt(teacher, student, torch.tensor([0, 0, 1, 1, 2, 3]))
        export = tmp_path / "export"
        group.save_pretrained(str(export))
    finally:
        group.shutdown()

    cfg = disc_cfg(tiny_model_dir, export, backend="deepspeed", zero_stage=3)
    group = DiscriminatorGroup(cfg)
    try:
        torch.testing.assert_close(group.score(student), after, rtol=1e-6, atol=1e-6)
        check_step_matches_reference(group, ReferenceBT(export, cfg), seed=30)
    finally:
        group.shutdown()


def _count_no_grad_rows(worker) -> int:
    """In a rank: count from now on the rows its no-grad passes forward (``forward_plan``
    runs them: D's scores and a BT step's first pass); the count so far."""
    if not hasattr(worker, "no_grad_rows"):
        forward_plan = worker.forward_plan

        def counting(batch, plan, fn):
            worker.no_grad_rows += sum(len(rows) for rows in plan)
            return forward_plan(batch, plan, fn)

        worker.no_grad_rows, worker.forward_plan = 0, counting
    return worker.no_grad_rows


def _no_grad_rows(group) -> int:
    """Rows forwarded without gradient so far, over the ranks."""
    return sum(ray.get([w.__ray_call__.remote(_count_no_grad_rows) for w in group.workers]))


def test_bt_step_reusing_the_student_scores_forwards_only_the_teacher_rows(
    ray_session, tiny_model_dir, init_dir, tmp_path
):
    """The same BT step from the same state twice: computing its first (no-grad) pass itself,
    and reusing the scores ``score`` gave for the student rows. The metrics and D's weights
    agree within fp32 rounding, and the reusing step's first pass forwards only the teacher
    rows (counted in the ranks). Scores from before an update, or of another batch, are
    refused."""
    cfg = disc_cfg(tiny_model_dir, init_dir)
    # Adam eps 1e-6 (as in tests/learner/conftest.py): a gradient entry that is ~0 but for float
    # noise would otherwise take a full lr-sized first step whose sign is that noise's
    cfg.algorithm.discriminator_optim.eps = 1e-6
    group = DiscriminatorGroup(cfg)
    try:
        teacher, student = batches(40)
        group.save_checkpoint(str(tmp_path / "ckpt"))
        initial = group.full_params()
        _no_grad_rows(group)  # install the counters
        rows = {}
        scores = group.score(student)
        before = _no_grad_rows(group)
        reused = group.train_bt(teacher, student, PAIRS, scores)
        rows["reused"] = _no_grad_rows(group) - before
        reused_weights = group.full_params()
        with pytest.raises(ValueError, match="since D's last update"):  # D moved since
            group.train_bt(teacher, student, PAIRS, scores)

        group.load_checkpoint(str(tmp_path / "ckpt"))
        with pytest.raises(ValueError, match="since D's last update"):  # new weights loaded
            group.train_bt(teacher, student, PAIRS, scores)
        before = _no_grad_rows(group)
        plain = group.train_bt(teacher, student, PAIRS)
        rows["plain"] = _no_grad_rows(group) - before
        plain_weights = group.full_params()

        assert rows == {"reused": len(teacher), "plain": len(teacher) + len(student)}
        keys = ("d_loss", "d_acc", "teacher_score_mean", "student_score_mean", "grad_norm")
        assert_close(reused, {k: plain[k] for k in keys}, tol=1e-6)
        # the two updates agree up to the fp32 rounding of a differently batched forward,
        # through Adam's first (sign-like) step: per tensor within 0.1% of the update's size
        step = {k: reused_weights[k] - w for k, w in initial.items()}
        assert max_rel_diff(step, {k: plain_weights[k] - w for k, w in initial.items()}) < 1e-3

        other = group.score(make_token_batch(seed=41, n=6))  # scores of another batch
        with pytest.raises(ValueError, match="for this student batch"):
            group.train_bt(teacher, student, PAIRS, other)
    finally:
        group.shutdown()


def test_tokenizer_mismatch_fails_before_actors_start(tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<new>"])
    tok.save_pretrained(other)
    with pytest.raises(ModelLoadError, match="tokenizers differ"):
        DiscriminatorGroup(disc_cfg(tiny_model_dir, other))
