"""Stage identity: keys carry the code-semantics version, which must be bumped when the code's meaning changes."""

from __future__ import annotations

from trainables import semantics
from trainables.stages.keys import stage_key

# The digest of trainables.semantics.SEMANTICS_SOURCES at this version. When this test fails you changed what a
# stage computes (models, losses, loop, procedure, data transforms): bump SEMANTICS_VERSION and record the new
# digest here, so stored stages of the old code are recomputed instead of silently reused. (Comments, docstrings
# and formatting do not change the digest.)
RECORDED = {2: "55e85d868977bd73", 3: "80f9c1d670129010"}


def test_semantics_version_is_bumped_when_the_code_changes():
    digest = semantics.semantics_digest()
    version = semantics.SEMANTICS_VERSION
    assert version in RECORDED, f"record SEMANTICS_VERSION {version} with digest {digest!r} in this test"
    assert RECORDED[version] == digest, (
        f"the sources of {semantics.SEMANTICS_SOURCES} changed (digest {digest!r}, recorded {RECORDED[version]!r}) "
        f"but SEMANTICS_VERSION is still {version}: bump it and record the new digest here")


def test_the_semantics_version_is_part_of_every_key():
    args = ("finetune", {"lr": 0.1}, None, "data", 0)
    assert stage_key(*args) == stage_key(*args, semantics=semantics.SEMANTICS_VERSION)
    assert stage_key(*args) != stage_key(*args, semantics=semantics.SEMANTICS_VERSION - 1)


def test_why_a_stage_is_recomputed(fmnist_root, tmp_path):
    import os

    from trainables.data import DataConfig, build_data
    from trainables.models import model_config
    from trainables.stages.chain import MODEL_FILE, plan, run_chain_locally, why_recomputed
    from trainables.stages.loop import Runtime
    from trainables.stages.procedure import OptimizerConfig, StageSettings, procedure
    from trainables.stages.store import StageStore

    data = build_data(DataConfig(root=fmnist_root, subset=120, val_size=20), 0)
    model = model_config(dict(variant="baseline", encoder="vgg_tiny", in_channels=1, image_size=28))
    stages = procedure(model, {k: StageSettings(epochs=1, batch_size=50, optimizer=OptimizerConfig(lr=0.05))
                               for k in ("classifier", "finetune")})
    store = StageStore(str(tmp_path / "store"))
    old = plan(stages, data.identity, 0, semantics=semantics.SEMANTICS_VERSION - 1)
    run_chain_locally(old[:1], store, data, Runtime(), 0)  # the classifier, stored by the previous code version
    now = plan(stages, data.identity, 0)
    assert why_recomputed(store, now, data.identity, 0) == {
        now[0].key: f"code semantics version changed (v{semantics.SEMANTICS_VERSION - 1} -> v{semantics.SEMANTICS_VERSION})",
        now[1].key: "not in the store"}
    run_chain_locally(now, store, data, Runtime(), 0)
    assert why_recomputed(store, now, data.identity, 0) == {}
    with open(os.path.join(store.root, now[1].key, MODEL_FILE), "r+b") as f:
        f.truncate(10)
    assert why_recomputed(store, now, data.identity, 0) == {now[1].key: "corrupt in the store"}
