"""Shipped params files (mcjax/assets): each card records its file's sha256 and loading
checks it, so a damaged or replaced file is a clear error naming it (issue 33)."""

import json
import shutil

import numpy as np
import pytest

from mcjax import assets
from mcjax.assets import AssetError


@pytest.mark.parametrize("shipped", [assets.SHIPPED_GIST, assets.SHIPPED_LENS])
def test_every_shipped_card_records_the_sha256_of_its_file(shipped):
    card = assets.read_card(shipped)
    assert card["sha256"] == assets.sha256_file(shipped)
    assert assets.load_params_safetensors(shipped)  # verified and read


def _copy(shipped, tmp_path):
    out = tmp_path / shipped.name
    shutil.copy(shipped, out)
    shutil.copy(assets.card_path(shipped), assets.card_path(out))
    return out


def test_random_byte_flips_in_a_params_file_are_detected_naming_the_file(tmp_path):
    """Flips anywhere — safetensors header or body — are refused before any array is read
    (a flipped body byte used to load as NaN parameters); a card without a sha256 (older
    files, bare warm starts) still loads, unverified."""
    path = _copy(assets.SHIPPED_GIST, tmp_path)
    clean = path.read_bytes()
    rng = np.random.default_rng(0)
    flips, detected = 40, 0
    for i in range(flips):
        data = bytearray(clean)
        at = int(rng.integers(200)) if i < 8 else int(rng.integers(len(data)))  # header too
        data[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(data))
        with pytest.raises(AssetError, match=f"{path.name}.*sha256") as e:
            assets.load_params_safetensors(path)
        assert "damaged" in str(e.value)
        detected += 1
    print(f"params byte flips: {flips} tried, {detected} detected, 0 harmless")
    path.write_bytes(clean)
    assets.load_params_safetensors(path)
    card = json.loads(assets.card_path(path).read_text())
    del card["sha256"]
    assets.card_path(path).write_text(json.dumps(card))
    assets.load_params_safetensors(path)  # no recorded sha256: nothing to compare


def test_written_cards_record_the_sha256(tmp_path):
    params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    out = assets.save_params_safetensors(params, tmp_path / "p.safetensors")
    card = assets.write_card(out, {"format": assets.FORMAT, "part": "gist",
                                   "config": {"gist": {}, "mc": {}}})
    assert json.loads(card.read_text())["sha256"] == assets.sha256_file(out)
    np.testing.assert_array_equal(assets.load_params_safetensors(out)["a"]["w"],
                                  params["a"]["w"])


def test_a_cards_serving_settings_override_its_training_config_where_they_say():
    """`config` is what the params were trained with; `serving` changes a setting they are
    served with (measured, recorded on the card): the card's configs are the served ones."""
    card = assets.read_card(assets.SHIPPED_GIST)
    trained = card["config"]["gist"]
    plain = dict(card, serving=None)
    assert assets.gist_config_from_card(plain).read_chunk == trained["read_chunk"]
    served = dict(card, serving={"config": {"gist": {"read_chunk": 256}}, "why": "test"})
    got = assets.gist_config_from_card(served)
    assert got.read_chunk == 256 and got.input_layer == trained["input_layer"]
    with pytest.raises(AssetError, match="unknown fields"):
        assets.gist_config_from_card(dict(card, serving={"config": {"gist": {"nosuch": 1}}}))
