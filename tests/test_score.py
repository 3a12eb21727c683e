"""score.py: segmentations made elsewhere (label images) scored against a dataset's truth."""
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

import predict
import score
import synthetic
import val
from conftest import write_image
from evaluation import bootstrap_interval
from metrics import dsb_score
from utils import run_cli

SIZE = 32


def labelled_dataset(folder, truths):
    """A StarDist-layout dataset: images/<id>.png (any grey image) and labels/<id>.png (16-bit) of ``truths``
    {id: int [H, W]}; returns the folder as str."""
    for img_id, labels in truths.items():
        write_image(os.path.join(folder, "images", f"{img_id}.png"), np.full(labels.shape, 40, np.uint8))
        write_image(os.path.join(folder, "labels", f"{img_id}.png"), labels.astype(np.uint16))
    return str(folder)


def random_labels(rng, count=8, size=SIZE):
    """int32 [size, size]: ``count`` rectangles (later ones over earlier ones), numbered with gaps (3, 10, 17...)."""
    labels = np.zeros((size, size), np.int32)
    for k in range(count):
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(3, 9, 2)
        labels[y:y + h, x:x + w] = 3 + 7 * k
    return labels


def brute_force_counts(truth, pred):
    """(TP, FP, FN) at IoU 0.5 by set arithmetic on every pair of objects, matched greedily (unique above 0.5), and
    the IoUs of the matched pairs (a list)."""
    true_ids, pred_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    matched, ious = set(), []
    for t in true_ids:
        for p in pred_ids:
            a, b = truth == t, pred == p
            if p not in matched and (a & b).sum() / (a | b).sum() > 0.5:
                matched.add(p)
                ious.append((a & b).sum() / (a | b).sum())
                break
    return len(matched), len(pred_ids) - len(matched), len(true_ids) - len(matched), ious


def run(argv, capsys):
    """score.py through run_cli -> (exit code, stdout, stderr)."""
    try:
        run_cli(score.main, argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_scores(path):
    return pd.read_csv(path, dtype={"img_id": str}).set_index("img_id")


def test_counts_and_dsb_match_a_brute_force_matching(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truths, preds = {}, {}
    for i in range(10):
        truth = random_labels(rng)
        pred = np.roll(truth, rng.integers(-2, 3, 2), axis=(0, 1)) * 5  # shifted, other ids
        pred[random_labels(rng, 2) > 0] = 999  # a spurious object over some
        truths[f"im{i}"], preds[f"im{i}"] = truth, pred
        write_image(tmp_path / "pred" / f"im{i}.png", pred.astype(np.uint16))
    table = score.main(["--pred", str(tmp_path / "pred"), "--truth", labelled_dataset(tmp_path / "data", truths)])
    table = table.set_index("img_id")
    assert table["tp"].sum() > 0 and table["fp"].sum() > 0 and table["fn"].sum() > 0  # every case is exercised
    for img_id, truth in truths.items():
        row, pred = table.loc[img_id], preds[img_id]
        tp, fp, fn, ious = brute_force_counts(truth, pred)
        assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn), img_id
        assert row["precision"] == pytest.approx(tp / (tp + fp)) and row["recall"] == pytest.approx(tp / (tp + fn))
        assert row["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        # Kirillov et al.'s panoptic quality: the matched IoUs over TP + FP/2 + FN/2
        assert row["pq"] == pytest.approx(sum(ious) / (tp + fp / 2 + fn / 2))
        assert row["sq"] == pytest.approx(np.mean(ious)) if ious else np.isnan(row["sq"])
        assert (row["true_nuclei"], row["pred_nuclei"]) == (tp + fn, tp + fp)
        assert row["dsb"] == pytest.approx(dsb_score(truth, pred))
    out = capsys.readouterr().out
    low, high = bootstrap_interval(table["dsb"].to_numpy())  # no separation of ours named
    assert "(bootstrap over the 10 images): IoU " in out and f", DSB2018 {low:.3f}-{high:.3f}\n" in out
    written = read_scores(tmp_path / "pred" / "scores.csv")
    assert written[["tp", "fp", "fn"]].equals(table.loc[written.index, ["tp", "fp", "fn"]].astype(np.int64))


def test_dsb_by_hand_and_pooled_iou_by_hand(tmp_path, capsys):
    """Image a: a true 5x10 nucleus, predicted by 31 of its pixels (IoU 0.62: matched at 0.50, 0.55, 0.60), and one
    predicted exactly: DSB2018 (3 x 1 + 7 x 1/3) / 10. Image b: 20 true pixels, 30 predicted, 10 shared."""
    a_truth, a_pred = np.zeros((SIZE, SIZE), np.int32), np.zeros((SIZE, SIZE), np.int32)
    a_truth[0:5, 0:10], a_truth[20:24, 20:24] = 1, 2
    a_pred[0:3, 0:10], a_pred[3, 0], a_pred[20:24, 20:24] = 4, 4, 9
    b_truth, b_pred = np.zeros((SIZE, SIZE), np.int32), np.zeros((SIZE, SIZE), np.int32)
    b_truth[0:2, 0:10] = 1
    b_pred[1:4, 0:10] = 1
    for img_id, pred in (("a", a_pred), ("b", b_pred)):
        write_image(tmp_path / "pred" / f"{img_id}_instances.png", pred.astype(np.uint16))
    code, out, _ = run(["--pred", str(tmp_path / "pred"), "--truth",
                        labelled_dataset(tmp_path / "data", {"a": a_truth, "b": b_truth})], capsys)
    assert code == 0
    table = read_scores(tmp_path / "pred" / "scores.csv")
    assert table.loc["a", "dsb"] == pytest.approx((3 + 7 / 3) / 10, abs=1e-6)
    assert table.loc["b", "iou"] == pytest.approx(10 / 40, abs=1e-6)
    assert table.loc["a", "iou"] == pytest.approx((31 + 16) / (50 + 16), abs=1e-6)
    pooled = (31 + 16 + 10) / (50 + 16 + 40)
    assert f"IoU  {pooled:.4f} pooled   {(10 / 40 + 47 / 66) / 2:.4f} mean per image" in out
    # a's two nuclei matched with IoU 0.62 and 1; b's one (IoU 0.25) not: PQ 0.81 and 0, SQ 0.81 and none
    assert table.loc["a", ["pq", "sq"]].tolist() == pytest.approx([0.81, 0.81]) and table.loc["b", "pq"] == 0
    assert np.isnan(table.loc["b", "sq"]) and "PQ 0.4050 (panoptic quality: F1 x SQ, the matched nuclei's mean " \
        "IoU, 0.8100; means per image)" in out
    assert list(table.index) == ["b", "a"]  # worst first
    assert "worst image b" in out


@pytest.mark.parametrize("suffix", ["", *score.PRED_SUFFIXES])
@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_predictions_pair_by_each_suffix(tmp_path, suffix, ext):
    truth = random_labels(np.random.default_rng(1))
    path = tmp_path / "pred" / f"x{suffix}{ext}"
    if ext == ".tif":
        os.makedirs(path.parent)
        tifffile.imwrite(path, truth.astype(np.uint16))
    else:
        write_image(path, truth.astype(np.uint16))
    table = score.main(["--pred", str(tmp_path / "pred"), "--truth", labelled_dataset(tmp_path / "data", {"x": truth})])
    assert table["prediction"].tolist() == [f"x{suffix}{ext}"] and table["dsb"].tolist() == [1.0]


def one_image(tmp_path, pred, name="x.png", truth=None):
    """--pred and --truth arguments for one image x: ``pred`` written as ``name`` (with cv2, or tifffile for .tif)
    against ``truth`` (default: random labels of SIZE)."""
    truth = random_labels(np.random.default_rng(2)) if truth is None else truth
    path = tmp_path / "pred" / name
    if name.endswith(".tif"):
        os.makedirs(path.parent, exist_ok=True)
        tifffile.imwrite(path, pred)
    else:
        write_image(path, pred)
    return ["--pred", str(tmp_path / "pred"), "--truth", labelled_dataset(tmp_path / "data", {"x": truth})]


@pytest.mark.parametrize("case", ["two candidates", "no prediction", "size", "colour", "float", "the truth itself",
                                  "no truth"])
def test_mistakes_give_one_line_naming_the_file_and_the_fix(tmp_path, capsys, case):
    labels = random_labels(np.random.default_rng(3)).astype(np.uint16)
    argv = one_image(tmp_path, {"size": labels[:20], "colour": np.dstack([labels % 256, labels * 0, labels * 0])
                                .astype(np.uint8), "float": labels.astype(np.float32) / 3}.get(case, labels),
                     "x.tif" if case == "float" else "x.png")
    if case == "two candidates":
        write_image(tmp_path / "pred" / "x_cp_masks.png", labels)
    if case == "no prediction":
        labelled_dataset(tmp_path / "data", {"y": labels})
    if case == "the truth itself":
        argv[1] = str(tmp_path / "data" / "labels")
    if case == "no truth":
        argv[3] = str(tmp_path / "annotated")
    code, out, err = run(argv, capsys)
    expected = {"two candidates": "x.png and x_cp_masks.png; choose with --suffix _cp_masks or --suffix ''",
                "no prediction": "1 of 2 images have no prediction in", "size": "x.png is 32x20 pixels, its truth",
                "colour": "x.png is a colour image", "float": "x.tif holds float32 values with fractions",
                "the truth itself": "is the truth of x itself",
                "no truth": f"--truth {tmp_path / 'annotated'}: no dataset of that name in inputs/"}[case]
    assert code != 0 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "pred" / "scores.csv").exists()


def test_a_binary_mask_is_scored_as_connected_components_with_a_note(tmp_path, capsys):
    truth = np.zeros((SIZE, SIZE), np.int32)
    truth[2:8, 2:8], truth[2:8, 8:14], truth[20:26, 20:26] = 1, 2, 3  # 1 and 2 touch
    argv = one_image(tmp_path, (truth > 0).astype(np.uint8) * 255, truth=truth)
    code, out, _ = run(argv, capsys)
    row = read_scores(tmp_path / "pred" / "scores.csv").loc["x"]
    assert code == 0 and "1 prediction is a binary mask, scored as its connected components" in out
    assert (row["iou"], row["pred_nuclei"], row["tp"], row["fn"]) == (1.0, 2, 1, 2)


def test_a_truth_that_gives_one_id_to_separate_nuclei_gets_a_note(tmp_path, capsys):
    """Two nuclei sharing an id are one nucleus to the score: a prediction that separates them scored a miss and two
    false nuclei without a word."""
    truth = np.zeros((SIZE, SIZE), np.int32)
    truth[2:8, 2:8], truth[20:26, 20:26], truth[10:15, 2:8] = 1, 1, 2  # two halves: neither matches above 0.5
    separated = np.where(truth * (np.arange(SIZE) >= 16)[None, :] == 1, 3, truth)
    argv = one_image(tmp_path, separated.astype(np.uint16), truth=truth)
    code, out, _ = run(argv, capsys)
    row = read_scores(tmp_path / "pred" / "scores.csv").loc["x"]
    assert code == 0 and (row["tp"], row["fp"], row["fn"]) == brute_force_counts(truth, separated)[:3] == (1, 2, 1)
    assert "note: in the truth of 1 image an id marks several separate objects, each scored as one nucleus" in out
    code, out, _ = run(one_image(tmp_path / "apart", separated.astype(np.uint16), truth=separated), capsys)
    assert code == 0 and "several separate objects" not in out
    # one such id among 120 (as resizing splits a few thin nuclei): under dataset.SPLIT_SHARE, no note
    many = np.kron(np.arange(1, 121).reshape(8, 15), np.ones((4, 4), np.int32))
    many = np.pad(many, 1) * np.pad(np.kron(np.ones((8, 15), np.int32), np.pad(np.ones((3, 3), np.int32), (0, 1))),
                                    1)
    many[many == 120] = 2
    code, out, _ = run(one_image(tmp_path / "many", many.astype(np.uint16), truth=many), capsys)
    assert code == 0 and "several separate objects" not in out
    many[many == 119] = 3
    code, out, _ = run(one_image(tmp_path / "more", many.astype(np.uint16), truth=many), capsys)
    assert code == 0 and "note: in the truth of 1 image an id marks several separate objects" in out


def test_predictions_without_truth_are_named_in_one_note_and_left_out(tmp_path, capsys):
    labels = random_labels(np.random.default_rng(4)).astype(np.uint16)
    argv = one_image(tmp_path, labels, "x_instances.png")
    for name in ("other_instances.png", "more.tif", "x_prob.png", "x_overlay.png"):  # x's own files are no strays
        write_image(tmp_path / "pred" / name, labels)
    code, out, _ = run(argv, capsys)
    assert code == 0 and "note: 2 files in" in out and "left out: more.tif, other_instances.png" in out
    assert read_scores(tmp_path / "pred" / "scores.csv").index.tolist() == ["x"]


def test_a_truth_without_instance_labels_gives_iou_and_dice_only(tmp_path, capsys):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 4:20] = 255
    write_image(tmp_path / "data" / "images" / "x.png", mask)
    write_image(tmp_path / "data" / "masks" / "0" / "x.png", mask)
    pred = np.zeros((SIZE, SIZE), np.uint16)
    pred[4:12, 4:12], pred[4:12, 12:20] = 1, 2  # the mask's pixels, as two nuclei
    write_image(tmp_path / "pred" / "x.png", pred)
    code, out, _ = run(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "data"), "--output",
                        str(tmp_path / "s.csv")], capsys)
    row = read_scores(tmp_path / "s.csv").loc["x"]
    assert code == 0 and row["iou"] == 1.0 and row["pred_nuclei"] == 2
    assert row[["dsb", "tp", "f1", "true_nuclei"]].isna().all()
    assert "mean per image\n  DSB2018" not in out and "the DSB2018 score and F1 need instance labels" in out


def test_predict_py_s_outputs_score_as_val_py_scores_them(tmp_path, monkeypatch, capsys):
    """On two images, the bundled model's masks (<id>.png, binary) score val.py's per-image IoU, and its nuclei
    (<id>_instances.png: the same separation and filters at the same size) val.py's DSB2018 score; the nuclei's own
    IoU is lower, as --min_confidence and --min_size drop some of the mask's objects. The nuclei's F1 and PQ are
    val.py's too."""
    monkeypatch.chdir(tmp_path)
    synthetic.generate_synthetic("inputs/syn", num_images=2, size=128, seed=3)
    predict.main(["--name", "nuclei", "--input", "inputs/syn/images", "--output", "pred", "--instances",
                  "--device", "cpu"])
    val.main(["--name", "nuclei", "--dataset", "syn", "--device", "cpu", "--no_overlays"])
    expected = read_scores("outputs/nuclei_on_syn/scores.csv")
    masks = score.main(["--pred", "pred", "--truth", "syn", "--suffix", ""]).set_index("img_id")
    nuclei = score.main(["--pred", "pred", "--truth", "syn", "--suffix", "_instances"]).set_index("img_id")
    for img_id in expected.index:
        assert masks.loc[img_id, "iou"] == pytest.approx(expected.loc[img_id, "iou"], abs=1e-6)
        assert masks.loc[img_id, "dice"] == pytest.approx(expected.loc[img_id, "dice"], abs=1e-6)
        for column in ("dsb", "tp", "fp", "fn", "f1", "pq", "sq"):  # val.py's instance scores, score.py's
            assert nuclei.loc[img_id, column] == pytest.approx(expected.loc[img_id, column], abs=1e-6), column
    assert (nuclei["iou"] <= masks["iou"] + 1e-9).all()
    assert "2 predictions are a binary mask" in capsys.readouterr().out


def test_an_empty_side_scores_1_only_when_both_are_empty(tmp_path, capsys):
    """Nothing found where there were nuclei has precision 0, not 1 (no false positives, but nothing right either);
    nuclei found where there were none recall 0: F1 and the DSB2018 score say 0 there too."""
    nuclei, empty = random_labels(np.random.default_rng(5)), np.zeros((SIZE, SIZE), np.int32)
    cases = {"missed": (nuclei, empty), "invented": (empty, nuclei), "both_empty": (empty, empty)}
    for img_id, (_, pred) in cases.items():
        write_image(tmp_path / "pred" / f"{img_id}.png", pred.astype(np.uint16))
    truths = {img_id: truth for img_id, (truth, _) in cases.items()}
    code, out, _ = run(["--pred", str(tmp_path / "pred"), "--truth", labelled_dataset(tmp_path / "data", truths)],
                       capsys)
    table = read_scores(tmp_path / "pred" / "scores.csv")
    assert code == 0
    assert table.loc["missed", ["precision", "recall", "f1", "dsb", "pq"]].tolist() == [0, 0, 0, 0, 0]
    assert table.loc["invented", ["precision", "recall", "f1", "dsb", "pq"]].tolist() == [0, 0, 0, 0, 0]
    assert table.loc["both_empty", ["precision", "recall", "f1", "dsb", "pq"]].tolist() == [1, 1, 1, 1, 1]
    assert f"precision {1 / 3:.4f}, recall {1 / 3:.4f}" in out


def test_fiji_s_float_label_images_score_as_their_whole_numbers(tmp_path):
    """Fiji saves a label image as 32-bit float: its values are the ids, exactly (float32 holds each up to 2**24)."""
    truth = random_labels(np.random.default_rng(6)) + 70000 * (random_labels(np.random.default_rng(6)) > 0)
    argv = one_image(tmp_path, truth.astype(np.float32), "x.tif", truth=truth)
    table = score.main(argv).set_index("img_id")
    assert table.loc["x", ["dsb", "tp", "fp", "pred_nuclei"]].tolist() == [1.0, 8, 0, 8]


def test_label_images_with_a_background_other_than_0_get_a_note(tmp_path, capsys):
    """A label image whose background is 1 marks every pixel as a nucleus: score.py says so of the side that does it,
    with the share counted here; label images with a background of 0 get no note."""
    truth = random_labels(np.random.default_rng(3))
    argv = one_image(tmp_path, truth, truth=truth)
    code, out, _ = run(argv, capsys)
    assert code == 0 and "note:" not in out
    shifted = np.where(truth == 0, 1, truth)
    argv = one_image(tmp_path / "shifted", shifted, truth=truth)
    code, out, _ = run(argv, capsys)
    assert code == 0 and f"note: the predictions in {tmp_path}/shifted/pred mark 100% of their pixels as nuclei" in out
    assert "note: the truth of" not in out
    argv = one_image(tmp_path / "shifted_truth", truth, truth=shifted)
    code, out, _ = run(argv, capsys)
    assert code == 0 and "note: the predictions in" not in out
    assert f"note: the truth of {tmp_path}/shifted_truth/data mark 100% of their pixels as nuclei" in out, out


@pytest.mark.parametrize("names", [("x_img_instances.png", "x_img.png", "x_img_prob.png"), ("x_img_cp_masks.png",)])
def test_a_cellpose_layout_truth_pairs_the_predictions_named_after_its_image_files(tmp_path, capsys, names):
    """In Cellpose's layout the image of id x is x_img.png, so predict.py --instances writes x_img_instances.png (and
    x_img.png, x_img_prob.png) and Cellpose x_img_cp_masks.png: each pairs with x, the others are x's own files."""
    truth = random_labels(np.random.default_rng(7))
    write_image(tmp_path / "data" / "x_img.png", np.full(truth.shape, 40, np.uint8))
    write_image(tmp_path / "data" / "x_masks.png", truth.astype(np.uint16))
    pred = truth.copy()
    pred[pred == pred.max()] = 0  # one nucleus missed, the others found, as a brute-force matching counts them
    for name in names:
        write_image(tmp_path / "pred" / name, pred.astype(np.uint16))
    code, out, err = run(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "data")], capsys)
    row = read_scores(tmp_path / "pred" / "scores.csv").loc["x"]
    assert code == 0 and row["prediction"] == names[0] and "left out" not in out, err
    tp, fp, fn, _ = brute_force_counts(truth, pred)
    assert (row["tp"], row["fp"], row["fn"]) == (tp, fp, fn) and tp > 0 and (fp, fn) == (0, 1)


@pytest.mark.parametrize("image, prediction, flags", [("x_img.png", "x_img_cp_masks.png", []),
                                                      ("x.tif", "x_cp_masks.png", ["--img_ext", ".tif"])])
def test_cellpose_s_predictions_beside_a_cellpose_layout_s_images_are_not_labels(tmp_path, capsys, image, prediction,
                                                                                 flags):
    """Cellpose run without --savedir writes x_img_cp_masks.png (x_cp_masks.png for x.tif) beside the images: the
    truth's layout read it as the label image of an image x_img_cp (x_cp) and refused the dataset, where Cellpose's
    own training folders leave those files out. Scored from that same folder, it pairs with x with --suffix
    _cp_masks, and scores as the same prediction in a folder of its own does."""
    truth = random_labels(np.random.default_rng(7))
    pred = truth.copy()
    pred[pred == pred.max()] = 0  # one nucleus missed
    for folder in ("data", "own"):
        write_image(tmp_path / folder / prediction, pred.astype(np.uint16))
    write_image(tmp_path / "data" / image, np.full(truth.shape, 40, np.uint8))
    write_image(tmp_path / "data" / "x_masks.png", truth.astype(np.uint16))
    code, out, err = run(["--pred", str(tmp_path / "data"), "--truth", str(tmp_path / "data"), "--suffix",
                          "_cp_masks", *flags], capsys)
    assert code == 0, err
    beside = read_scores(tmp_path / "data" / "scores.csv").loc["x"]
    code, out, err = run(["--pred", str(tmp_path / "own"), "--truth", str(tmp_path / "data"), *flags], capsys)
    own = read_scores(tmp_path / "own" / "scores.csv").loc["x"]
    assert code == 0 and beside["prediction"] == own["prediction"] == prediction, err
    tp, fp, fn, _ = brute_force_counts(truth, pred)
    assert (beside["tp"], beside["fp"], beside["fn"]) == (own["tp"], own["fp"], own["fn"]) == (tp, fp, fn)
