"""method=clip_es (CLIP-ES, reference-implementations.md §15): each formula against a hand-written reference on the
small randomly initialised CLIP of ViT-B/16's family (clip.arch=tiny: the same code path, other sizes), the
weights key, the config and plan without stage cls, and the toy chain to a val mIoU."""
from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from wsss_dist.registry import VOC_CLASSES  # noqa: E402
from wsss_dist.config import make_config  # noqa: E402
from wsss_dist.errors import ConfigError  # noqa: E402
from wsss_dist.methods import clip_es  # noqa: E402
from wsss_dist.models import clip as clipm  # noqa: E402
from wsss_dist.models import clip_weights  # noqa: E402

@pytest.fixture(scope="module")
def tiny():
    """The tiny CLIP and its (class, background) text embeddings of the VOC prompts."""
    model = clipm.build_clip(clipm.TINY, clipm.RANDOM)
    cpu = torch.device("cpu")
    names = VOC_CLASSES
    emb = clipm.text_embeddings(model, clipm.TINY, clip_es.class_prompts("toy", names), cpu)
    bg = clipm.text_embeddings(model, clipm.TINY, clip_es.background_prompts("toy"), cpu)
    return model, emb, bg


def _reference_gradcam(model, x, classes, emb, bg):
    """Hand-written softmax-Grad-CAM through open_clip's own forward (hooks on the last block's ln_1 and on ln_post),
    one full forward + backward per class, the positional grid resized by hand for a non-square input."""
    m = copy.deepcopy(model)
    v = m.visual
    p = v.conv1.kernel_size[0]
    h, w = x.shape[-2] // p, x.shape[-1] // p
    pos = v.positional_embedding.data
    g = int((pos.shape[0] - 1) ** 0.5)
    grid = F.interpolate(pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                         align_corners=False)
    v.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)]))
    seen = {}

    def keep(name):
        def hook(mod, inputs, out):
            if name == "A":
                out.retain_grad()
            seen[name] = out
        return hook

    v.transformer.resblocks[-1].ln_1.register_forward_hook(keep("A"))
    v.ln_post.register_forward_hook(keep("post"))
    m.requires_grad_(False)
    v.conv1.weight.requires_grad_(True)  # so that the graph reaches ln_1's output
    cams = []
    for k in range(len(classes)):
        v(x)
        f = seen["post"][:, 1:].mean(1) @ v.proj
        f = f / f.norm(dim=-1, keepdim=True)
        text = torch.cat([emb[classes], bg])
        s = torch.softmax(m.logit_scale.exp() * f[0] @ text.T, -1)
        s[k].backward()
        A, G = seen["A"][0, 1:], seen["A"].grad[0, 1:]
        alpha = G.mean(0)
        cam = torch.relu((A * alpha).sum(-1)).reshape(h, w)
        for _ in range(2):
            cam = cam - cam.min()
            cam = cam / (cam.max() + 1e-7)
        cams.append(cam.detach())
    return torch.stack(cams)


@pytest.mark.parametrize("size", [(64, 64), (48, 56)])
def test_softmax_gradcam_equals_a_hand_written_autograd_reference(tiny, size):
    model, emb, bg = tiny
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    classes = torch.tensor([2, 8, 14])
    out = clipm.image_pass(model, x)
    scores = clip_es.softmax_scores(out.features, emb, bg, [classes], float(model.logit_scale.exp()))
    ours = clip_es.grad_cams(out.tokens, scores, out.grid)[0]
    ref = _reference_gradcam(model, x, classes, emb, bg)
    assert ours.shape == ref.shape == (3, size[0] // 8, size[1] // 8)
    assert ours.amax() > 0.99 and not torch.allclose(ours[0], ours[1], atol=1e-3)  # distinct, non-trivial maps
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_one_forward_per_image_and_scale_serves_all_classes_and_images_do_not_interact(tiny):
    model, emb, bg = tiny
    torch.manual_seed(2)
    x = torch.randn(2, 3, 40, 48)
    classes = [torch.tensor([0, 14, 19]), torch.tensor([7])]
    calls = []
    handle = model.visual.conv1.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        both = clip_es.clip_es_cams(model, x, classes, emb, bg, scales=(1.0, 0.75))
        assert calls == [2, 2]  # one batched forward per scale, whatever the number of classes
        alone = [clip_es.clip_es_cams(model, x[i:i + 1], [c], emb, bg, scales=(1.0, 0.75))[0]
                 for i, c in enumerate(classes)]
    finally:
        handle.remove()
    assert [tuple(c.shape) for c in both] == [(3, 40, 48), (1, 40, 48)]
    for a, b in zip(both, alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # batched matmuls: float noise only


def _dense_caa(attn: np.ndarray, layers: int, rounds: int) -> np.ndarray:
    """CAA written out element by element: mean of the last ``layers`` maps without CLS, ``rounds`` × (column sums,
    row sums), (D + Dᵀ)/2, then R_ij = Σ_k S_ik S_kj."""
    n = attn.shape[-1] - 1
    d = np.zeros((n, n))
    for layer in range(attn.shape[0] - layers, attn.shape[0]):
        for i in range(n):
            for j in range(n):
                d[i, j] += attn[layer, i + 1, j + 1] / layers
    for _ in range(rounds):
        col = [sum(d[i, j] for i in range(n)) for j in range(n)]
        d = np.array([[d[i, j] / col[j] for j in range(n)] for i in range(n)])
        row = [sum(d[i, j] for j in range(n)) for i in range(n)]
        d = np.array([[d[i, j] / row[i] for j in range(n)] for i in range(n)])
    s = np.array([[(d[i, j] + d[j, i]) / 2 for j in range(n)] for i in range(n)])
    return np.array([[sum(s[i, k] * s[k, j] for k in range(n)) for j in range(n)] for i in range(n)])


def test_caa_affinity_follows_the_reference_normalisation_exactly():
    torch.manual_seed(3)
    attn = torch.softmax(torch.randn(12, 13, 13) * 2, -1).double()  # 12 blocks, CLS + 12 tokens
    ours = clip_es.caa_affinity(attn, layers=8, rounds=3, steps=1).double()
    ref = _dense_caa(attn.numpy(), 8, 3)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert np.allclose(ref, ref.T)  # symmetric
    # the normalisation is not a no-op: fewer rounds or layers give another matrix
    assert not np.allclose(ours.numpy(), _dense_caa(attn.numpy(), 8, 1), rtol=1e-3)
    assert not np.allclose(ours.numpy(), _dense_caa(attn.numpy(), 12, 3), rtol=1e-3)


def test_refinement_is_the_masked_affinity_product_min_max_normalised():
    torch.manual_seed(4)
    R = torch.rand(12, 12)
    cams = torch.rand(2, 3, 4)
    masks = torch.rand(2, 3, 4) > 0.5
    ours = clip_es.refine(cams, R, masks)
    for k in range(2):
        c, m = cams[k].flatten(), masks[k].flatten().float()
        ref = torch.tensor([sum(R[i, j] * m[j] * c[j] for j in range(12)) for i in range(12)])
        ref = (ref - ref.min()) / ((ref - ref.min()).max() + 1e-7)
        torch.testing.assert_close(ours[k].flatten(), ref, atol=1e-6, rtol=1e-5)


def test_box_mask_is_the_union_of_region_boxes_above_the_threshold():
    cam = np.zeros((8, 10), dtype=np.float32)
    cam[1, 1] = cam[2, 2] = cam[2, 3] = 1.0  # diagonal neighbours: one 8-connected region → box rows 1-2, cols 1-3
    cam[5:7, 6] = 0.6  # a second region above 0.4 · max
    cam[6, 1] = 0.3  # below the threshold: no box
    m = clip_es.box_mask(cam, 0.4)
    want = np.zeros_like(m)
    want[1:3, 1:4] = True
    want[5:7, 6:7] = True
    np.testing.assert_array_equal(m, want)
    assert clip_es.box_mask(cam, 0.7).sum() == 6  # at 0.7 only the first region
    edge = np.zeros((6, 6), dtype=np.float32)
    edge[3:6, 4:6] = 1.0  # touches the right and bottom edges
    assert clip_es.box_mask(edge, 0.4)[3:6, 4:6].all()
    legacy = clip_es.box_mask(edge, 0.4, legacy_edge=True)  # CLIP-ES: the box loses its last row and column
    assert legacy[3:5, 4:5].all() and legacy.sum() == 2


def test_the_box_mask_bounds_the_refinement(tiny):
    """Only sources inside the boxes propagate: whatever the CAM is outside them, the refined CAM is the same."""
    torch.manual_seed(5)
    R = clip_es.caa_affinity(torch.softmax(torch.randn(1, 12, 1 + 30, 1 + 30), -1))[0]
    cam = torch.zeros(1, 5, 6)
    cam[0, 1:3, 1:3] = torch.rand(2, 2) + 0.5
    mask = torch.as_tensor(clip_es.box_mask(cam[0].numpy(), 0.4))[None]
    assert mask.sum() == 4
    noisy = cam.clone()
    noisy[~mask] = torch.rand(int((~mask).sum()))
    torch.testing.assert_close(clip_es.refine(cam, R, mask), clip_es.refine(noisy, R, mask))
    assert not torch.allclose(clip_es.refine(noisy, R, torch.ones_like(mask)), clip_es.refine(cam, R, mask))


def test_voc_prompts_carry_clip_es_synonyms_and_the_background_set():
    prompts = clip_es.class_prompts("voc", VOC_CLASSES)
    assert len(prompts) == 20 and prompts[0] == "a clean origami aeroplane."
    assert prompts[14] == "a clean origami person with clothes,people,human." and prompts[19].endswith("tvmonitor screen.")
    assert len(clip_es.background_prompts("voc")) == 25 and len(clip_es.background_prompts("coco")) == 23
    assert clip_es.background_prompts("voc", ("floor",), "a photo of {}.") == ["a photo of floor."]


def test_weights_key_resolves_local_files_and_folders_and_never_downloads(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = clipm.build_clip(clipm.TINY, clipm.RANDOM)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    snap = tmp_path / "models--me--tiny-clip" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    folder = snap.parents[1]
    assert clip_weights.resolve_weights(clipm.TINY, str(folder)) == str(snap / "open_clip_model.safetensors")
    loaded = clipm.build_clip(clipm.TINY, str(folder))
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    scripted = tmp_path / "ViT-tiny.pt"  # OpenAI's release format: a TorchScript archive
    torch.jit.script(model).save(str(scripted))
    assert clipm.is_torchscript(str(scripted))
    torch.testing.assert_close(clipm.build_clip(clipm.TINY, str(scripted)).visual.proj, model.visual.proj)
    other = tmp_path / "other.safetensors"
    save_file({"visual.proj": model.visual.proj.contiguous()}, str(other))
    with pytest.raises(ConfigError, match="not a tiny CLIP checkpoint"):
        clipm.build_clip(clipm.TINY, str(other))
    for bad, says in ((str(tmp_path / "nope.pt"), "not found"), (str(tmp_path), "no open_clip_model")):
        with pytest.raises(ConfigError, match=says):
            clip_weights.resolve_weights("ViT-B-16-quickgelu", bad)
    monkeypatch.setattr(clip_weights, "_hf_cached", lambda repo, names: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="not in the local caches.*pre-fetch") as e:
        clip_weights.resolve_weights("ViT-B-16-quickgelu", "openai")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="known: openai"):
        clip_weights.resolve_weights("ViT-B-16-quickgelu", "nonsense")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # installed, but its import fails (e.g. a torch mismatch)
    with pytest.raises(ConfigError, match=r"^clip.weights=openai: open_clip cannot be imported"):
        clip_weights.resolve_weights("ViT-B-16-quickgelu", "openai")


def test_the_preflight_checks_clip_names_and_files_without_torch(tmp_path, monkeypatch):
    """The launcher's pre-flight of method=clip_es (tiny + random, or an open_clip name + a weights file) imports
    neither torch nor open_clip: the model names come from a cache per open_clip version (written on first use, the
    same as open_clip's own list); a misspelt name is a one-line error with the closest names."""
    import subprocess
    from importlib import metadata

    import open_clip

    from wsss_dist.models.preflight import check_clip, clip_model_names

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "wsss_dist" / f"open_clip_torch-{metadata.version('open_clip_torch')}-models.json"
    assert clip_model_names() == frozenset(open_clip.list_models()) and cache.is_file()
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"x")
    code = ("import sys; from wsss_dist.config import make_config; from wsss_dist.models.preflight import preflight; "
            "preflight(make_config(['stage=cam', 'method=clip_es', 'clip.arch=tiny', 'clip.weights=random'])); "
            f"preflight(make_config(['stage=cam', 'method=clip_es', 'clip.arch=ViT-B-16', 'clip.weights={weights}'])); "
            "print(sorted(m for m in ('torch', 'open_clip', 'timm') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # XDG_CACHE_HOME: tmp_path
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
    with pytest.raises(ConfigError, match=r"^clip.arch=ViT-B-61: not an open_clip model \(or tiny\); did you mean ViT-B-16"):
        check_clip("ViT-B-61", "random")


def test_clip_es_has_no_cls_stage_and_no_classifier_init(tmp_path):
    cfg = make_config(["method=clip_es"])
    assert "cls" not in cfg.stages() and cfg.stages()[:2] == ["shards", "cam"]
    assert (cfg.aff.init, cfg.seg.init) == ("imagenet", "imagenet")  # the method's preset over the toy preset
    assert make_config(["method=cam"]).aff.init == "cls"  # other methods keep theirs
    with pytest.raises(ConfigError, match="trains no classifier"):
        make_config(["method=clip_es", "seg.init=cls"])
    with pytest.raises(ConfigError, match="has no stage cls"):
        make_config(["method=clip_es", "stage=cls"])
    from wsss_dist.fingerprints import stage_settings, upstream

    assert upstream(cfg, "cam") == [] and upstream(make_config([]), "cam") == ["cls"]
    assert "clip.weights" in stage_settings(cfg, "cam") and stage_settings(cfg, "cam")["method"] == "clip_es"
    assert not any(k.startswith("clip.") for k in stage_settings(make_config([]), "cam"))  # default chain: unchanged
    from wsss_dist.models.preflight import preflight

    with pytest.raises(ConfigError, match="clip.weights is unset"):
        preflight(make_config(["method=clip_es", "clip.weights=", "stage=cam"]))


def test_a_sweep_over_cam_and_clip_es_plans_both_chains(tmp_path, monkeypatch):
    from wsss_dist.launcher.main import submit

    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    submit(["method=[cam,clip_es]", "cluster=slurm", "launch.dry_run=true", "stage=all", f"run={tmp_path}/sw",
            f"data.shards_dir={tmp_path}/shards"], out=lines.append)
    text = "\n".join(lines)
    jobs = [ln.split(":")[:2] for ln in text.splitlines() if "would submit" in ln]
    clip_jobs = [j[1].strip() for j in jobs if j[0].endswith("clip_es")]
    cam_jobs = [j[1].strip() for j in jobs if j[0].endswith(" cam")]
    assert clip_jobs == ["cam", "aff", "pseudo", "seg", "eval"] and cam_jobs[:2] == ["cls", "cam"], text
    assert "[sweep] report" in text


@pytest.mark.slow
def test_the_toy_chain_with_clip_es_runs_to_a_val_miou(shards, tmp_path):
    from wsss_dist import pipeline

    run = tmp_path / "run"
    cfg = make_config([*shards, "method=clip_es", "stage=all", f"run={run}"])
    pipeline.run(cfg)
    assert not (run / "cls").exists()
    cam = json.loads((run / "cam" / "DONE").read_text())
    assert 0 < cam["metrics"]["miou"] < 1 if "metrics" in cam else 0 < cam["miou"] < 1
    meta = json.loads((run / "cam" / "clip_text.json").read_text())
    assert len(meta["prompts"]) == 20 + 25 and np.load(run / "cam" / "clip_text.npy").shape == (45, 32)
    ev = json.loads((run / "eval" / "DONE").read_text())
    miou = ev.get("metrics", ev)["miou"]
    assert 0 < miou < 1
    from wsss_dist.stages.report import load_run

    assert load_run(run)["status"] == "done"  # no cls stage, yet a finished run
