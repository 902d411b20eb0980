"""PF-Willow reader on the real fixture images, .mat files and pair list."""

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from sd4match.data import open_dataset
from sd4match.errors import DataError


def test_records_equal_raw_mat_files(willow_root):
    recs = open_dataset("pfwillow", willow_root).pairs("test")
    assert len(recs) == 450
    assert [r.id for r in recs[:3]] == ["0", "1", "2"]
    for r in recs[::37]:
        for rel, kps, size in ((r.src, r.src_kps, r.src_size), (r.trg, r.trg_kps, r.trg_size)):
            mat = loadmat(str(willow_root / rel).replace(".png", ".mat"))["pts_coord"]  # row 0 = x, row 1 = y
            np.testing.assert_allclose(kps, mat.T, rtol=0, atol=1e-9)
            with Image.open(willow_root / rel) as im:
                assert size == im.size
        assert r.category == r.src.split("/")[1]
        # standard base: max extent of the target points; sd4match: same in the 768 frame
        W, H = r.trg_size
        ext = r.trg_kps.max(0) - r.trg_kps.min(0)
        assert r.pck_base["standard"] == pytest.approx(max(ext))
        assert r.pck_base["sd4match"] == pytest.approx(max(ext[0] * 768 / W, ext[1] * 768 / H))
        assert r.src_bbox is None and r.trg_bbox is None


def test_first_pair_by_hand(willow_root):
    r = open_dataset("pfwillow", willow_root).pairs("test")[0]
    assert (r.src, r.trg) == ("PF-dataset/car(G)/Cars_006a.png", "PF-dataset/car(G)/Cars_007a.png")
    assert r.trg_size == (300, 225)
    # target x range 21.5594..156.1236 = 134.5642; y range 98.7386..179.3681 = 80.6295
    assert r.pck_base["standard"] == pytest.approx(156.12356478950247 - 21.559400140592086)
    assert r.pck_base["sd4match"] == pytest.approx(max(134.56416464891038 * 768 / 300, (179.36811684761378 - 98.73857689603992) * 768 / 225))


def _copy(tmp_path, willow_root):
    import shutil

    root = tmp_path / "pf-willow"
    shutil.copytree(willow_root, root)
    return root


def test_wrong_column_count(tmp_path, willow_root):
    root = _copy(tmp_path, willow_root)
    lines = (root / "test_pairs.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0]
    (root / "test_pairs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_pairs\.csv:4: expected 42 columns, got 41"):
        open_dataset("pfwillow", root).pairs("test")


def test_nan_coordinate(tmp_path, willow_root):
    root = _copy(tmp_path, willow_root)
    lines = (root / "test_pairs.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[5] = "nan"  # XA4
    lines[1] = ",".join(cells)
    (root / "test_pairs.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"test_pairs\.csv:2: XA4 is not finite"):
        open_dataset("pfwillow", root).pairs("test")


def test_missing_and_corrupt_image(tmp_path, willow_root):
    root = _copy(tmp_path, willow_root)
    (root / "PF-dataset/car(G)/Cars_007a.png").unlink()
    with pytest.raises(DataError, match=r"Cars_007a\.png: image file is missing"):
        open_dataset("pfwillow", root).pairs("test")
    (root / "PF-dataset/car(G)/Cars_007a.png").write_bytes(b"\x89PNG not really a png")
    with pytest.raises(DataError, match=r"Cars_007a\.png: not a readable image"):
        open_dataset("pfwillow", root).pairs("test")


def test_wrong_layout(tmp_path):
    with pytest.raises(DataError, match="not a PF-Willow root"):
        open_dataset("pfwillow", tmp_path)


def test_pair_list_saved_by_a_spreadsheet_reads_as_the_original(tmp_path, willow_root):
    """Excel's "CSV UTF-8": a byte-order mark before the header and CRLF line ends."""
    root = _copy(tmp_path, willow_root)
    text = (willow_root / "test_pairs.csv").read_text(encoding="utf-8")
    (root / "test_pairs.csv").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    got, want = open_dataset("pfwillow", root).pairs("test"), open_dataset("pfwillow", willow_root).pairs("test")
    assert [r.to_json() for r in got] == [r.to_json() for r in want]
    (root / "test_pairs.csv").write_bytes(text.encode("utf-16"))
    with pytest.raises(DataError, match=r"test_pairs\.csv: UTF-16 text .*save it as UTF-8"):
        open_dataset("pfwillow", root).pairs("test")


def test_pair_records_round_trip_through_json_lines(tmp_path, willow_root):
    from sd4match.data import read_jsonl, write_jsonl

    recs = open_dataset("pfwillow", willow_root).pairs("test")[:20]
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        assert write_jsonl(recs, fh) == 20
    back = read_jsonl(path)
    assert [r.to_json() for r in back] == [r.to_json() for r in recs]
    path.write_text(path.read_text().replace("\n", "\n[1, 2]\n", 1))
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: expected a pair record \(a JSON object\), not a list"):
        read_jsonl(path)
