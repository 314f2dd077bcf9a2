"""Stop automata: the token-level tables fire exactly where the stop text first appears, for any split."""

import numpy as np
import pytest

from mgpo_jax.rollout import parse
from mgpo_jax.sampling import StopStrings, StopTokens, as_stop_rule, compile_rule, first_stop, token_bytes
from mgpo_jax.sampling.stops import StopCompiler
from mgpo_jax.models.qwen2_5_vl.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  # Repeated fenced blocks make BPE learn merged tokens such as "```\n" and "}]```".
  corpus = ["The red car is at the left of the image, so the answer is \\boxed{B}."] * 5 + [
      '```json\n[{"bbox_2d": [1, 2, 3, 4]}]```\n\nok 答案', "x}]```\n", "```\n\n", "``` `` `"] * 40
  return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=600, corpus=corpus)


def reference_end(data: bytes, parts) -> int | None:
  """Byte index just past the parts found in order (plain bytes search), or None."""
  pos = 0
  for p in parts:
    at = data.find(p.encode(), pos)
    if at < 0:
      return None
    pos = at + len(p.encode())
  return pos


def reference_first_stop(tb, seq, parts) -> int | None:
  data = b""
  for i, t in enumerate(seq):
    data += tb[t]
    if reference_end(data, parts) is not None:
      return i
  return None


@pytest.mark.parametrize("rule", [parse.TURN1_STOP, "```", "答案", StopStrings(("a", "b", "a"))],
                         ids=["turn1_fence", "fence", "utf8", "aba"])
def test_table_fires_where_text_first_contains_the_rule(tok, rule):
  rule = as_stop_rule(rule)
  V = len(tok) + 10  # model vocab larger than the tokenizer's, as for Qwen
  tb = token_bytes(tok, V)
  assert tb[-1] == b""
  merged = [i for i, b in enumerate(tb) if b"```" in b and b != b"```"]
  assert merged, "the corpus should produce tokens that merge the fence with neighbours"
  table = compile_rule(rule, tb)
  assert table.shape == (rule.num_states, V)
  # Random texts made of pieces of the rule (and noise), each piece tokenised on its own: this gives real
  # token ids in canonical and non-canonical splits, with frequent matches and near misses.
  pieces = [p for part in rule.parts for p in (part, part[:1], part[1:], part[:-1])] + [
      "```", "``", "`", "json", "\n", "}]", " ", "x", "答", "案", "a", "b"]
  pool = [i for i, b in enumerate(tb) if b"`" in b]
  rng = np.random.default_rng(0)
  fired = 0
  for _ in range(600):
    seq = []
    for _ in range(int(rng.integers(1, 9))):
      if rng.random() < 0.2:
        seq.append(int(rng.choice(pool)))
      else:
        seq += tok.encode(str(rng.choice(pieces)), add_special_tokens=False)
    want = reference_first_stop(tb, seq, rule.parts)
    assert first_stop(table, seq) == want, [tb[t] for t in seq]
    fired += want is not None
  assert 10 <= fired < 590  # both matches and misses were exercised


def test_turn1_rule_ignores_the_opening_fence_and_matches_merged_closings(tok):
  table = compile_rule(as_stop_rule(parse.TURN1_STOP), token_bytes(tok, len(tok)))
  for text in ['```json\n[{"bbox_2d": [1, 2, 3, 4]}]```\n\nok', 'see ```json\n[]\n```', "``` `` ```json x}]```\n"]:
    ids = tok.encode(text, add_special_tokens=False)
    i = first_stop(table, ids)
    assert i is not None
    head = tok.decode(ids[:i + 1])
    assert parse.truncate_after_json(text) == parse.truncate_after_json(head)
    assert parse.TURN1_STOP.end(tok.decode(ids[:i])) is None
  assert first_stop(table, tok.encode("```json\n[1]", add_special_tokens=False)) is None


def test_token_sequence_rule_is_kmp_over_ids():
  table = compile_rule(StopTokens((5, 5, 7)), [b""] * 10)
  assert first_stop(table, [5, 5, 5, 7, 1]) == 3
  assert first_stop(table, [5, 7, 5, 5, 1, 7]) is None


def test_compiler_pads_to_static_shape_and_rejects_overflow(tok):
  comp = StopCompiler(tok, len(tok), max_rules=2, max_states=16)
  t = comp([parse.TURN1_STOP])
  assert t.next_RSV.shape == (2, 16, len(tok)) and t.accept_R.tolist() == [10, -1]
  assert comp([parse.TURN1_STOP]) is t  # cached
  with pytest.raises(ValueError, match="max_stop_states"):
    comp(["x" * 20])
  with pytest.raises(ValueError, match="max_stop_rules"):
    comp(["a", "b", "c"])
  with pytest.raises(ValueError, match="stop rule"):
    as_stop_rule(3.5)
