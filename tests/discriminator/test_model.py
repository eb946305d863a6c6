"""The discriminator model: score position, padding invariance, init from the student, HF
export round trip, tokenizer check."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from gad_ray.data.batch import make_batch
from gad_ray.discriminator.model import DiscriminatorModel, check_discriminator_tokenizer
from gad_ray.models.loading import ModelLoadError, load_tokenizer
from gad_ray.models.score_head import ScoreHead, last_response_index
from tests.config_builder import learner_config
from tests.learner.conftest import make_token_batch


@pytest.fixture(scope="module")
def disc(tiny_model_dir):
    return DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=3).eval()


def test_last_response_index_by_hand():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    assert last_response_index(mask).tolist() == [2, 4, 0]
    with pytest.raises(ValueError, match=r"rows \[1\].*no response tokens"):
        last_response_index(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


@torch.no_grad()
def test_score_is_head_at_last_response_token_and_ignores_right_padding(disc):
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15, 16]]
    batch = make_batch(prompts, responses, pad_id=0)
    scores = disc(batch.input_ids, batch.attention_mask, batch.response_mask)
    hidden = disc.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    by_hand = hidden.last_hidden_state[[0, 1], [4, 6]] @ disc.score.weight[0]  # p + r - 1
    torch.testing.assert_close(scores, by_hand)
    for i in range(2):  # each row alone (no padding) and with extra right padding of other ids
        alone = make_batch([prompts[i]], [responses[i]], pad_id=0)
        padded = make_batch([prompts[i]], [responses[i] + [1999] * 4], pad_id=0)
        padded.attention_mask[0, len(prompts[i]) + len(responses[i]) :] = 0
        padded.response_mask[0, len(prompts[i]) + len(responses[i]) :] = 0
        for b in (alone, padded):
            got = disc(b.input_ids, b.attention_mask, b.response_mask)
            torch.testing.assert_close(got, scores[i : i + 1], rtol=1e-5, atol=1e-5)
    last = torch.tensor([4, 6])
    torch.testing.assert_close(disc(batch.input_ids, batch.attention_mask, last_index=last), scores)


def test_init_from_student_backbone_and_seeded_head(tiny_model_dir, disc):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm_params = dict(lm.named_parameters())
    for name, p in disc.model.named_parameters():
        torch.testing.assert_close(p, lm_params[f"model.{name}"], msg=name)
    assert disc.score.weight.shape == (1, lm.config.hidden_size) and disc.score.bias is None
    again = DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=3)
    other = DiscriminatorModel.from_pretrained(str(tiny_model_dir), seed=4)
    assert torch.equal(again.score.weight, disc.score.weight)
    assert not torch.equal(other.score.weight, disc.score.weight)
    assert disc.config.num_labels == 1 and disc.config.attention_dropout == 0.0


@torch.no_grad()
def test_save_pretrained_reloads_with_identical_scores(tiny_model_dir, disc, tmp_path):
    batch = make_token_batch(seed=4, n=5)
    want = disc(batch.input_ids, batch.attention_mask, batch.response_mask)
    disc.save_pretrained(str(tmp_path / "d"), load_tokenizer(str(tiny_model_dir)))
    back = DiscriminatorModel.from_pretrained(str(tmp_path / "d"), seed=99).eval()
    torch.testing.assert_close(
        back(batch.input_ids, batch.attention_mask, batch.response_mask), want
    )
    # a standard HF reward model: its own last-non-pad pooling agrees on right-padded rows
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "d").eval()
    ids = batch.input_ids.clone()
    ids[batch.attention_mask == 0] = hf.config.pad_token_id = 2000
    torch.testing.assert_close(
        hf(input_ids=ids, attention_mask=batch.attention_mask).logits[:, 0], want
    )
    with pytest.raises(ValueError, match="no response tokens"):
        back(batch.input_ids, batch.attention_mask, torch.zeros_like(batch.response_mask))


def test_tokenizer_mismatch_is_a_clear_error(tiny_model_dir, tmp_path):
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    cfg = learner_config(tiny_model_dir)
    assert len(check_discriminator_tokenizer(cfg)) == len(load_tokenizer(str(tiny_model_dir)))
    cfg.model.discriminator.path = str(other)
    with pytest.raises(ModelLoadError, match=r"student .* and discriminator .*other-tok.* differ"):
        check_discriminator_tokenizer(cfg)


def test_score_head_computes_in_fp32_and_with_a_bf16_holders_fp32_master():
    """The head upcasts its input and computes with an fp32 weight; a module held in bf16
    (DeepSpeed) computes with the fp32 master it is given, and its gradient reaches the
    module's weight: x^T dL/dscore."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen).to(torch.bfloat16)
    master = 0.02 * torch.randn(1, 64, generator=gen)
    head = ScoreHead(64)
    with torch.no_grad():
        head.weight.copy_(master)
    want = (x.double() @ master.double().T).squeeze(-1)
    out = head(x).squeeze(-1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)
    assert not bool((out == out.to(torch.bfloat16).float()).all())

    held = ScoreHead(64, dtype=torch.bfloat16)  # the bf16 module weight, its master apart
    with torch.no_grad():
        held.weight.copy_(master)
    held.fp32_master = lambda: master
    out = held(x).squeeze(-1)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-7)
    coef = torch.randn(8, generator=gen)
    (coef * out).sum().backward()
    assert held.weight.grad.dtype == torch.bfloat16
    grad = (coef.double() @ x.double())[None]
    torch.testing.assert_close(held.weight.grad.double(), grad, rtol=1e-2, atol=1e-3)
