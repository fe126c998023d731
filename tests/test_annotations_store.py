"""The SQLite annotation store: round trips, spatial queries against brute force, undo
and redo against a pure-Python model, persistence, pairing with its image, bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from napari_histo_ai.annotations.model import KINDS, REVIEW_STATES, Annotation, ImageRef
from napari_histo_ai.annotations.store import SCHEMA_VERSION, AnnotationStore
from napari_histo_ai.errors import AnnotationError

H, W = 1000, 800
REF = ImageRef("/slides/a.svs", "sha256:aaaa", (H, W), mpp=(0.25, 0.25))
VOL = ImageRef("/vol/b.nii.gz", "sha256:bbbb", (5, 200, 300), axes="ZYX", spacing_mm=(2, 1, 1))
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

coord = st.floats(0, 1, allow_nan=False)


@st.composite
def annotations(draw: st.DrawFn, ref: ImageRef = REF) -> Annotation:
    kind = draw(st.sampled_from(["point", "line", "polyline", "box", "polygon"]))
    n = {"point": 1, "line": 2, "box": 2}.get(kind) or draw(
        st.integers(2 if kind == "polyline" else 3, 8)
    )
    h, w = ref.shape[-2:]
    coords = np.array([[draw(coord) * h, draw(coord) * w] for _ in range(n)])
    if kind == "box" and (coords[0] == coords[1]).any():
        coords[1] = np.minimum(coords[0] + 1, [h, w])
        coords[0] = coords[1] - 1
    plane = tuple(draw(st.integers(0, s - 1)) for s in ref.shape[:-2])
    source = draw(st.sampled_from(["human", "mitosis-unet"]))
    human = source == "human"
    return Annotation(
        kind,
        coords,
        class_name=draw(st.sampled_from(["", "mitosis", "tumour", "mass"])),
        plane=plane,
        source=source,
        model_version=None if human else draw(st.sampled_from(["1.0", "2.1"])),
        annotator=draw(st.sampled_from([None, "ann", "bob"])),
        created=draw(st.floats(1e9, 2e9)),
        modified=draw(st.floats(1e9, 2e9)),
        confidence=None if human else draw(st.floats(0, 1)),
        review=draw(st.sampled_from(REVIEW_STATES)),
        measurements=draw(
            st.dictionaries(st.sampled_from(["area_um2", "length_mm"]), st.floats(0, 1e6))
        ),
    )


def _same(a: Annotation, b: Annotation) -> None:
    assert a.kind == b.kind
    np.testing.assert_array_equal(a.coords, b.coords)
    for name in (
        "class_name",
        "plane",
        "source",
        "model_version",
        "annotator",
        "created",
        "modified",
        "confidence",
        "review",
        "measurements",
    ):
        assert getattr(a, name) == getattr(b, name), name


@pytest.fixture
def store(tmp_path: Path):
    with AnnotationStore.create(tmp_path / "a.sqlite", REF, classes=["mitosis"]) as s:
        yield s


# ------------------------------------------------------------------ round trip
@SETTINGS
@given(anns=st.lists(annotations(), min_size=1, max_size=12))
def test_round_trip_keeps_geometry_class_provenance(tmp_path: Path, anns: list[Annotation]):
    path = tmp_path / f"rt{abs(hash(str(anns))) % 10**9}.sqlite"
    with AnnotationStore.create(path, REF) as s:
        ids = s.add(anns)
        assert len(set(ids)) == len(anns) == len(s)
        for i, a in zip(ids, anns, strict=True):
            got = s.get(i)
            assert got.id == i
            _same(got, a)
    with AnnotationStore.open(path, image=REF) as s:  # and after reopening
        back = list(s.iter_all())
        assert [b.id for b in back] == sorted(ids)
        for a, i in zip(anns, ids, strict=True):
            _same(s.get(i), a)
        names = {a.class_name for a in anns if a.class_name}
        assert names <= set(s.classes)
        for review in REVIEW_STATES:
            want = sum(a.review == review for a in anns)
            assert s.count(reviews=[review]) == want
            assert s.count(reviews=[review], kinds=["point"]) == sum(
                a.review == review and a.kind == "point" for a in anns
            )
        assert s.integrity_check() == "ok"


@SETTINGS
@given(anns=st.lists(annotations(VOL), min_size=1, max_size=8))
def test_round_trip_volume_planes(tmp_path: Path, anns: list[Annotation]):
    path = tmp_path / f"vol{abs(hash(str(anns))) % 10**9}.sqlite"
    with AnnotationStore.create(path, VOL) as s:
        ids = s.add(anns)
        for i, a in zip(ids, anns, strict=True):
            _same(s.get(i), a)
        for z in range(VOL.shape[0]):
            want = {i for i, a in zip(ids, anns, strict=True) if a.plane == (z,)}
            assert {a.id for a in s.iter_all(plane=(z,))} == want
            got = {a.id for a in s.query((0, 0, 200, 300), plane=(z,), include_rejected=True)}
            assert got == want
        everything = s.query((0, 0, 200, 300), plane=None, include_rejected=True)
        assert len(everything) == len(anns)


# ------------------------------------------------------------------ queries
def _random_store(path: Path, n: int, seed: int) -> tuple[AnnotationStore, list[Annotation]]:
    rng = np.random.default_rng(seed)
    anns = []
    for k in range(n):
        kind = ["point", "point", "box", "polygon", "line"][k % 5]
        centre = rng.uniform([0, 0], [H, W])
        nv = {"point": 1, "box": 2, "line": 2}.get(kind, 5)
        coords = np.clip(centre + rng.normal(0, 20, (nv, 2)), 0, [H, W])
        if kind == "point":
            coords = centre[None]
        review = REVIEW_STATES[int(rng.integers(len(REVIEW_STATES)))]
        anns.append(Annotation(kind, coords, "mitosis", review=review))
    s = AnnotationStore.create(path, REF)
    ids = s.add(anns)
    for i, a in zip(ids, anns, strict=True):
        a.id = i
    return s, anns


def _brute(anns, box, *, kinds=None, rejected=False) -> set[int]:
    top, left, bottom, right = box
    out = set()
    for a in anns:
        t, lft, b, r = a.bounds()
        if kinds and a.kind not in kinds:
            continue
        if not rejected and a.review == "rejected":
            continue
        if b >= top and t <= bottom and r >= left and lft <= right:
            out.add(a.id)
    return out


boxes = st.tuples(
    st.floats(-50, H + 50), st.floats(-50, W + 50), st.floats(0, 600), st.floats(0, 600)
).map(lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    s, anns = _random_store(tmp_path_factory.mktemp("q") / "q.sqlite", 600, seed=1)
    # some deleted objects must never come back from a query
    gone = [a.id for a in anns[::7]]
    s.delete(gone)
    live = [a for a in anns if a.id not in set(gone)]
    yield s, live
    s.close()


def _same_columns(s: AnnotationStore, cols, anns: list[Annotation]) -> None:
    """`query_columns` holds exactly what `query` returns, field by field."""
    assert cols.id.tolist() == [a.id for a in anns] and len(cols) == len(anns)
    for k, a in enumerate(anns):
        assert KINDS[cols.kind[k]] == a.kind and REVIEW_STATES[cols.review[k]] == a.review
        np.testing.assert_array_equal(cols.vertices(k), a.coords)
        assert (s.classes[cols.class_index[k]] if cols.class_index[k] >= 0 else "") == a.class_name
        assert (cols.source[k], cols.model_version[k], cols.annotator[k]) == (
            a.source,
            a.model_version,
            a.annotator,
        )
        assert (cols.created[k], cols.modified[k]) == (a.created, a.modified)
        conf = cols.confidence[k]
        assert (a.confidence is None and np.isnan(conf)) or conf == a.confidence
    half = cols.take(np.arange(len(cols))[::2])
    assert half.id.tolist() == [a.id for a in anns[::2]]
    for k, a in enumerate(anns[::2]):
        np.testing.assert_array_equal(half.vertices(k), a.coords)


@SETTINGS
@given(box=boxes, rejected=st.booleans(), kinds=st.sampled_from([None, ["point"], ["box", "line"]]))
def test_query_matches_brute_force(populated, box, rejected, kinds):
    s, anns = populated
    want = _brute(anns, box, kinds=kinds, rejected=rejected)
    got = s.query(box, kinds=kinds, include_rejected=rejected)
    assert [a.id for a in got] == sorted(want)
    assert s.count_in(box, kinds=kinds, include_rejected=rejected) == len(want)
    _same_columns(s, s.query_columns(box, kinds=kinds, include_rejected=rejected), got)
    ids, coords, cls, rev = s.query_points(box, include_rejected=rejected)
    want_pts = _brute(anns, box, kinds=["point"], rejected=rejected)
    assert list(ids) == sorted(want_pts)
    by_id = {a.id: a for a in anns}
    for i, c, k, r in zip(ids, coords, cls, rev, strict=True):
        np.testing.assert_array_equal(c, by_id[int(i)].coords[0])
        assert s.classes[k] == "mitosis"
        assert REVIEW_STATES[r] == by_id[int(i)].review


@SETTINGS
@given(box=boxes, limit=st.integers(1, 80))
def test_query_limit_is_a_subset_of_the_right_size(populated, box, limit):
    s, anns = populated
    want = _brute(anns, box)
    got = [a.id for a in s.query(box, limit=limit)]
    _same_columns(s, s.query_columns(box, limit=limit), s.query(box, limit=limit))
    assert set(got) <= want
    assert len(got) == min(limit, len(want))
    ids = s.query_points(box, limit=limit)[0]
    want_pts = _brute(anns, box, kinds=["point"])
    assert set(ids.tolist()) <= want_pts
    assert len(ids) == min(limit, len(want_pts))


def test_level_of_detail_is_spread_over_the_view(tmp_path: Path):
    """A zoomed-out limited query shows every part of the slide, and the estimate of the
    total is close to the exact count."""
    rng = np.random.default_rng(0)
    pts = rng.uniform([0, 0], [H, W], (20_000, 2))
    with AnnotationStore.create(tmp_path / "lod.sqlite", REF) as s:
        s.add([Annotation("point", p[None], review="unreviewed") for p in pts])
        ids, coords, _, _ = s.query_points((0, 0, H, W), limit=400)
        assert len(ids) == 400
        counts, _, _ = np.histogram2d(coords[:, 0], coords[:, 1], bins=4, range=[[0, H], [0, W]])
        assert counts.min() > 0.5 * counts.mean()  # no quarter of the view left empty
        exact = s.count_in((0, 0, H, W))
        assert exact == 20_000
        s.update(s.query_points((0, 0, 100, 100))[0].tolist(), review="rejected")
        hidden = s.count(reviews=["rejected"])
        assert hidden > 0
        # a box around the whole image takes the O(1) path: same answers
        for rejected in (False, True):
            assert s.count_in((-5, -5, H + 5, W + 5), include_rejected=rejected) == (
                s.count_in((-0.5, -0.5, H + 0.5, W + 0.5), include_rejected=rejected)
            )
        assert s.count_in((-5, -5, H + 5, W + 5)) == exact - hidden
        s.undo()
        estimate = s.count_in((0, 0, H, W), exact=False, sample=2000)
        assert abs(estimate - exact) < 0.15 * exact
        assert s.count_in((0, 0, 10, 10), exact=False) == s.count_in((0, 0, 10, 10))


# ------------------------------------------------------------------ undo / redo
class UndoRedoMachine(RuleBasedStateMachine):
    """Random add / update / delete / undo / redo / reopen against a pure-Python model:
    a list of snapshots ``{id: (coords, class, review)}`` with a cursor."""

    ids = Bundle("ids")

    @initialize()
    def start(self) -> None:
        import tempfile

        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "m.sqlite"
        self.store = AnnotationStore.create(self.path, REF, annotator="tester")
        self.states: list[dict[int, tuple]] = [{}]
        self.labels: list[str] = []
        self.cursor = 0

    def teardown(self) -> None:
        if hasattr(self, "store"):
            assert self.store.integrity_check() == "ok"  # counts match the objects
            self.store.close()
            self.tmp.cleanup()

    @property
    def state(self) -> dict[int, tuple]:
        return self.states[self.cursor]

    def _push(self, state: dict[int, tuple], label: str) -> None:
        del self.states[self.cursor + 1 :]
        del self.labels[self.cursor :]
        self.states.append(state)
        self.labels.append(label)
        self.cursor += 1

    @rule(target=ids, pts=st.lists(st.tuples(coord, coord), min_size=1, max_size=3))
    def add(self, pts):
        anns = [Annotation("point", [[r * H, c * W]], "mitosis") for r, c in pts]
        new = self.store.add(anns, label="add")
        state = dict(self.state)
        for i, a in zip(new, anns, strict=True):
            state[i] = (tuple(a.coords[0]), "mitosis", "added")
        self._push(state, "add")
        return multiple(*new)

    @rule(i=ids, r=coord, c=coord, cls=st.sampled_from(["mitosis", "mimic"]))
    def update(self, i, r, c, cls):
        if i not in self.state:
            with pytest.raises(AnnotationError, match="do not exist"):
                self.store.update(i, coords=[[r * H, c * W]])
            return
        self.store.update(i, coords=[[r * H, c * W]], class_name=cls, review="corrected")
        state = dict(self.state)
        state[i] = ((r * H, c * W), cls, "corrected")
        self._push(state, "edit")

    @rule(i=ids)
    def delete(self, i):
        if i not in self.state:
            return
        self.store.delete([i])
        state = dict(self.state)
        del state[i]
        self._push(state, "delete")

    @rule(
        target=ids,
        steps=st.lists(
            st.one_of(
                st.tuples(st.just("add"), coord, coord),
                st.tuples(st.just("update"), st.integers(0, 40), coord, coord),
                st.tuples(st.just("delete"), st.integers(0, 40)),
                st.tuples(st.sampled_from(["nested", "nested_fail"]), coord, coord),
            ),
            max_size=6,
        ),
        fail=st.booleans(),
    )
    def group(self, steps, fail):
        """Several writes in one `group`: one undo step, or nothing at all when an
        exception leaves it; a nested group joins it (or, failing, undoes only its own
        writes). Live ids are picked by index, so one object is often changed twice."""
        state = dict(self.state)
        new: list[int] = []
        wrote = False

        def add(r, c):
            (i,) = self.store.add([Annotation("point", [[r * H, c * W]], "mitosis")])
            state[i] = ((r * H, c * W), "mitosis", "added")
            new.append(i)

        try:
            with self.store.group("group"):
                for step in steps:
                    live = sorted(state)
                    if step[0] == "add":
                        add(step[1], step[2])
                    elif step[0] in ("update", "delete") and live:
                        i = live[step[1] % len(live)]
                        if step[0] == "delete":
                            self.store.delete([i])
                            del state[i]
                        else:
                            xy = [[step[2] * H, step[3] * W]]
                            self.store.update(i, coords=xy, review="corrected")
                            state[i] = (tuple(xy[0]), state[i][1], "corrected")
                    elif step[0] == "nested":
                        with self.store.group("inner"):
                            add(step[1], step[2])
                    elif step[0] == "nested_fail":
                        with pytest.raises(ZeroDivisionError), self.store.group("inner"):
                            self.store.add([Annotation("point", [[step[1] * H, 1.0]])])
                            if live:
                                self.store.delete([live[0]])
                            raise ZeroDivisionError
                        continue
                    else:
                        continue
                    wrote = True
                if fail:
                    raise KeyError("abandon the group")
        except KeyError:
            assert fail
            return multiple()
        if wrote:
            self._push(state, "group")
        return multiple(*new)

    @rule()
    def undo(self):
        label = self.store.undo()
        if self.cursor == 0:
            assert label is None
        else:
            assert label == self.labels[self.cursor - 1]
            self.cursor -= 1

    @rule()
    def redo(self):
        label = self.store.redo()
        if self.cursor == len(self.states) - 1:
            assert label is None
        else:
            assert label == self.labels[self.cursor]
            self.cursor += 1

    @precondition(lambda self: hasattr(self, "store"))
    @rule()
    def reopen(self):
        self.store.close()
        self.store = AnnotationStore.open(self.path, image=REF, annotator="tester")

    @invariant()
    def matches_model(self):
        if not hasattr(self, "store"):
            return
        got = {a.id: (tuple(a.coords[0]), a.class_name, a.review) for a in self.store.iter_all()}
        assert got == self.state
        assert len(self.store) == len(self.state)
        for review in ("added", "corrected"):
            want = sum(1 for v in self.state.values() if v[2] == review)
            assert self.store.count(reviews=[review]) == want
        assert self.store.count(kinds=["point"]) == len(self.state)
        assert self.store.count(kinds=["box"]) == 0
        assert self.store.can_undo == (self.cursor > 0)
        assert self.store.can_redo == (self.cursor < len(self.states) - 1)


UndoRedoMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
test_undo_redo_state_machine = UndoRedoMachine.TestCase


def test_a_group_is_one_undo_step_and_one_transaction(store: AnnotationStore):
    """Reject a mixed selection (update model objects, delete human ones) and redraw a
    box as a polygon, each in one group: one undo each, and nothing is visible to
    another connection until the group ends."""
    model = Annotation("box", [[10, 10], [50, 60]], "mitosis", source="det", review="unreviewed")
    human = Annotation("point", [[100, 100]], "mitosis")
    m, h = store.add([model, human])
    other = sqlite3.connect(store.path)
    with store.group("reject 2"):
        store.update([m], review="rejected")
        store.delete([h])
        (extra,) = store.add([Annotation("point", [[5, 5]], "new class")])
        # not committed: another reader still sees the objects as they were
        assert other.execute("SELECT count(*) FROM objects WHERE deleted = 0").fetchone() == (2,)
        with pytest.raises(AnnotationError, match="cannot undo inside a group"):
            store.undo()
    assert other.execute("SELECT count(*) FROM objects WHERE deleted = 0").fetchone() == (2,)
    other.close()
    assert [x["label"] for x in store.history()] == ["add", "reject 2"]
    assert store.history()[-1]["kind"] == "group"
    assert store.get(m).review == "rejected" and len(store) == 2
    assert "new class" in store.classes
    assert store.undo() == "reject 2"
    assert store.get(m).review == "unreviewed" and store.get(h).review == "added"
    with pytest.raises(AnnotationError, match="does not exist"):
        store.get(extra)
    assert store.redo() == "reject 2"
    assert store.count(reviews=["rejected"]) == 1 and store.get(extra).class_name == "new class"
    assert store.undo() == "reject 2"
    # a kind change is one update: same id, counts by kind kept in step
    ring = [[10, 10], [10, 60], [50, 60], [30, 10]]
    store.update(m, kind="polygon", coords=ring, review="corrected", label="as polygon")
    got = store.get(m)
    assert got.kind == "polygon" and got.review == "corrected"
    np.testing.assert_array_equal(got.coords, ring)
    assert store.count(kinds=["box"]) == 0 and store.count(kinds=["polygon"]) == 1
    assert store.undo() == "as polygon"
    assert store.get(m).kind == "box" and store.count(kinds=["box"]) == 1
    np.testing.assert_array_equal(store.get(m).coords, [[10, 10], [50, 60]])
    assert store.integrity_check() == "ok"


def test_a_failed_group_leaves_nothing(store: AnnotationStore):
    (a,) = store.add([Annotation("point", [[1, 1]], "mitosis")], label="first")
    (b,) = store.add([Annotation("point", [[2, 2]], "mitosis")], label="second")
    assert store.undo() == "second"
    store.metadata["run"] = "/runs/1"
    with pytest.raises(AnnotationError, match="outside the image"), store.group("bad"):
        store.update(a, class_name="tumour", review="corrected")
        store.metadata["run"] = "/runs/2"
        store.add([Annotation("point", [[3, 3]], "stroma")])
        store.add([Annotation("point", [[5000, 3]], "mitosis")])  # refused: all rolled back
    assert [(x["label"], x["undone"]) for x in store.history()] == [
        ("first", False),
        ("second", True),  # the redo branch is kept too
    ]
    assert store.get(a).class_name == "mitosis" and len(store) == 1
    assert store.classes == ["mitosis"] and store.metadata["run"] == "/runs/1"
    # a failed write inside a group undoes only itself; the group goes on
    with store.group("partly"):
        store.update(a, review="accepted")
        with pytest.raises(AnnotationError, match="do not exist"):
            store.update([a, 999], review="rejected")
        with pytest.raises(AnnotationError, match="unknown class"):
            store.add([Annotation("point", [[4, 4]], "mimic")], allow_new_classes=False)
    assert store.get(a).review == "accepted"
    assert [x["label"] for x in store.history()] == ["first", "partly"]
    with store.group("nothing"):  # no write: no operation
        pass
    assert [x["label"] for x in store.history()] == ["first", "partly"]
    with pytest.raises(AnnotationError, match="does not exist"):
        store.get(b)  # dropped with the redo branch by the first group that wrote
    assert store.integrity_check() == "ok"


def test_another_thread_waits_for_a_group_to_end(store: AnnotationStore):
    import threading

    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.group("slow"):
            store.add([Annotation("point", [[1, 1]], "mitosis")])
            inside.set()
            release.wait(10)
            store.add([Annotation("point", [[2, 2]], "mitosis")])

    t = threading.Thread(target=writer)
    t.start()
    assert inside.wait(10)
    undone: list[str | None] = []
    u = threading.Thread(target=lambda: undone.append(store.undo()))
    u.start()
    u.join(0.2)
    assert u.is_alive()  # not refused, not run inside the other thread's group: waiting
    release.set()
    t.join(10)
    u.join(10)
    assert undone == ["slow"] and len(store) == 0


def test_update_many_and_undo_restores_everything(store: AnnotationStore):
    anns = [
        Annotation(
            "polygon", [[10, 10], [10, 50], [40, 30]], "tumour", source="seg", review="unreviewed"
        ),
        Annotation(
            "box",
            [[100, 100], [150, 180]],
            "mass",
            source="det",
            confidence=0.9,
            review="unreviewed",
        ),
    ]
    ids = store.add(anns)
    before = [store.get(i) for i in ids]
    many = store.get_many([ids[1], 999, ids[0]])  # absent ids are left out
    assert set(many) == set(ids)
    for a in before:
        _same(many[a.id], a)
    new = [np.array([[11, 11], [11, 51], [41, 31]]), np.array([[90, 90], [160, 190]])]
    store.update(ids, coords=new, review="corrected", measurements={"area_um2": 5.0})
    after = [store.get(i) for i in ids]
    for a, c in zip(after, new, strict=True):
        np.testing.assert_array_equal(a.coords, c)
        assert a.review == "corrected" and a.annotator == store.annotator
        assert a.measurements == {"area_um2": 5.0}
    assert store.query((85, 85, 92, 92), kinds=["box"])[0].id == ids[1]  # index moved too
    assert store.undo() == "edit"
    for a, b in zip(before, (store.get(i) for i in ids), strict=True):
        _same(a, b)
    assert store.query((85, 85, 92, 92), kinds=["box"]) == []
    assert store.redo() == "edit"
    np.testing.assert_array_equal(store.get(ids[1]).coords, new[1])


def test_new_op_after_undo_drops_the_redo_branch(store: AnnotationStore):
    (a,) = store.add([Annotation("point", [[5, 5]], "mitosis")], label="first")
    (b,) = store.add([Annotation("point", [[6, 6]], "mitosis")], label="second")
    assert store.undo() == "second"
    (c,) = store.add([Annotation("point", [[7, 7]], "mitosis")], label="third")
    assert c != b  # ids are never reused
    assert not store.can_redo
    assert [h["label"] for h in store.history()] == ["first", "third"]
    assert {x.id for x in store.iter_all()} == {a, c}
    with pytest.raises(AnnotationError, match="does not exist"):
        store.get(b)


def test_history_survives_close_and_reopen(tmp_path: Path):
    path = tmp_path / "h.sqlite"
    with AnnotationStore.create(path, REF, annotator="ann") as s:
        (i,) = s.add([Annotation("point", [[10, 10]], "mitosis")])
        s.update(i, coords=[[20, 20]], label="move")
        s.delete(i, label="remove")
        assert s.undo() == "remove"
    with AnnotationStore.open(path, image=REF, annotator="bob") as s:
        assert s.can_undo and s.can_redo
        assert s.redo() == "remove"
        assert len(s) == 0
        assert s.undo() == "remove"
        assert s.undo() == "move"
        np.testing.assert_array_equal(s.get(i).coords, [[10, 10]])
        assert [h["annotator"] for h in s.history()] == ["ann", "ann", "ann"]
        s.update(i, review="accepted")
        assert s.get(i).annotator == "bob"
        assert s.integrity_check() == "ok"


# ------------------------------------------------------------------ review queue, meta
def test_next_unreviewed_walks_regions_in_row_major_order(store: AnnotationStore):
    pts = [(100, 2000), (50, 100), (1500, 10), (900, 900), (20, 1100)]
    big = ImageRef("/s.svs", "", (4000, 4000))
    path = store.path.with_name("q.sqlite")
    with AnnotationStore.create(path, big) as s:
        ids = s.add([Annotation("point", [p], review="unreviewed") for p in pts])
        s.add([Annotation("point", [[60, 110]], review="accepted")])
        order = []
        a = s.next_unreviewed(region_px=1024)
        while a is not None and a.id not in order:
            order.append(a.id)
            a = s.next_unreviewed(after=tuple(a.coords[0]), region_px=1024)
        # regions (0,0): (50,100), (900,900); (0,1): (20,1100), (100,2000); (1,0): (1500,10)
        assert order == [ids[1], ids[3], ids[4], ids[0], ids[2]]
        s.update(ids, review="accepted")
        assert s.next_unreviewed() is None


@pytest.fixture(scope="module")
def queue_store(tmp_path_factory):
    rng = np.random.default_rng(5)
    big = ImageRef("/q.svs", "", (4000, 4000))
    s = AnnotationStore.create(tmp_path_factory.mktemp("queue") / "q.sqlite", big)
    anns = []
    for k in range(300):
        centre = rng.uniform(0, 4000, 2)
        review = "unreviewed" if rng.random() < 0.3 else "accepted"
        if k % 3:
            anns.append(Annotation("point", [centre], review=review))
        else:
            box = np.clip([centre - rng.uniform(1, 300, 2), centre + 40], 0, 4000)
            anns.append(Annotation("box", box, review=review))
    for i, a in zip(s.add(anns), anns, strict=True):
        a.id = i
    yield s, anns
    s.close()


@SETTINGS
@given(r=st.floats(0, 4000), c=st.floats(0, 4000), region=st.sampled_from([256, 1000, 1024]))
def test_next_unreviewed_matches_brute_force(queue_store, r, c, region):
    s, anns = queue_store

    def key(a: Annotation) -> tuple:
        t, lft, b, rt = a.bounds()
        cr, cc = (t + b) / 2, (lft + rt) / 2
        return (0, int(cr // region), int(cc // region), cr, cc)

    todo = sorted((a for a in anns if a.review == "unreviewed"), key=lambda a: (key(a), a.id))
    here = (0, int(r // region), int(c // region), r, c)
    later = [a for a in todo if key(a) > here]
    want = (later or todo)[0]
    got = s.next_unreviewed(after=(r, c), region_px=region)
    assert got is not None and got.id == want.id


def test_classes_and_metadata_persist(tmp_path: Path):
    path = tmp_path / "m.sqlite"
    with AnnotationStore.create(path, REF, classes=["mitosis", "mimic", "mitosis"]) as s:
        assert s.classes == ["mitosis", "mimic"]
        assert s.add_class("tumour") == 2
        s.metadata["run"] = "/runs/7"
        s.metadata["model"] = {"name": "mitosis-unet", "version": "1.0"}
        s.add([Annotation("point", [[1, 1]], "stroma")])
    with AnnotationStore.open_or_create(path, REF, classes=["fat"]) as s:
        assert s.classes == ["mitosis", "mimic", "tumour", "stroma", "fat"]
        assert dict(s.metadata) == {
            "run": "/runs/7",
            "model": {"name": "mitosis-unet", "version": "1.0"},
        }
        del s.metadata["run"]
    with AnnotationStore.open(path) as s:
        assert list(s.metadata) == ["model"]


# ------------------------------------------------------------------ refusals and bad input
def test_open_refuses_another_image(tmp_path: Path):
    path = tmp_path / "a.sqlite"
    AnnotationStore.create(path, REF).close()
    other = ImageRef("/slides/b.svs", "sha256:ffff", (H, W))
    with pytest.raises(AnnotationError) as err:
        AnnotationStore.open(path, image=other)
    text = str(err.value)
    assert "sha256:aaaa" in text and "sha256:ffff" in text and "/slides/a.svs" in text
    with pytest.raises(AnnotationError, match=r"shape \(1000, 800\)"):
        AnnotationStore.open(path, image=ImageRef("/slides/a.svs", "", (10, 10)))
    with pytest.raises(AnnotationError, match="sha256:ffff"):
        AnnotationStore.open_or_create(path, other)
    # the same image moved: accepted, and the new path is remembered
    moved = ImageRef("/elsewhere/a.svs", "sha256:aaaa", (H, W))
    with AnnotationStore.open(path, image=moved) as s:
        assert s.image.path == "/elsewhere/a.svs" and s.image.mpp == (0.25, 0.25)
    with AnnotationStore.open(path) as s:
        assert s.image.path == "/elsewhere/a.svs"


def test_open_refuses_files_that_are_not_stores(tmp_path: Path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AnnotationError, match="not a napari-histo-ai annotation store"):
        AnnotationStore.open(junk)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AnnotationError, match="not a napari-histo-ai annotation store"):
        AnnotationStore.open(other)
    with pytest.raises(AnnotationError, match="no annotation store"):
        AnnotationStore.open(tmp_path / "missing.sqlite")
    with pytest.raises(AnnotationError, match="already exists"):
        AnnotationStore.create(junk, REF)
    assert junk.read_bytes().startswith(b"not a database")  # untouched


def test_open_refuses_a_newer_schema(tmp_path: Path):
    path = tmp_path / "new.sqlite"
    AnnotationStore.create(path, REF).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(SCHEMA_VERSION + 1),)
    )
    conn.commit()
    conn.close()
    with pytest.raises(AnnotationError, match=f"version {SCHEMA_VERSION + 1} is newer"):
        AnnotationStore.open(path)


def test_add_rejects_bad_geometry_and_writes_nothing(store: AnnotationStore):
    good = Annotation("point", [[10, 10]], "mitosis")
    with pytest.raises(
        AnnotationError, match=r"annotation 1 \(point\) has vertex 0 at \(row, col\) = \(2000, 10\)"
    ):
        store.add([good, Annotation("point", [[2000, 10]], "mitosis")])
    with pytest.raises(AnnotationError, match=r"annotation 0 .*polygon.* at least 3"):
        store.add([Annotation("polygon", [[1, 1], [2, 2]])])
    with pytest.raises(AnnotationError, match="non-finite"):
        store.add([good, good, Annotation("line", [[1, 1], [np.nan, 2]])])
    with pytest.raises(AnnotationError, match="unknown annotation kind"):
        store.add([Annotation("circle", [[1, 1]])])
    with pytest.raises(AnnotationError, match="unknown review state"):
        store.add([Annotation("point", [[1, 1]], review="maybe")])
    with pytest.raises(AnnotationError, match=r"plane \(2,\)"):
        store.add([Annotation("point", [[1, 1]], plane=(2,))])
    with pytest.raises(AnnotationError, match=r"confidence 1\.5"):
        store.add([Annotation("point", [[1, 1]], source="m", confidence=1.5)])
    with pytest.raises(AnnotationError, match="annotation 1 has unknown class 'mimic'"):
        store.add([good, Annotation("point", [[1, 1]], "mimic")], allow_new_classes=False)
    assert len(store) == 0 and not store.can_undo
    assert store.classes == ["mitosis"]


def test_update_rejects_bad_changes(store: AnnotationStore):
    (i,) = store.add([Annotation("line", [[1, 1], [5, 5]], "mitosis")])
    with pytest.raises(AnnotationError, match="outside the image"):
        store.update(i, coords=[[1, 1], [5, 5000]])
    with pytest.raises(AnnotationError, match="needs 2 vertices"):
        store.update(i, coords=[[1, 1]])
    with pytest.raises(AnnotationError, match="cannot update field"):
        store.update(i, source="x")
    with pytest.raises(AnnotationError, match="a polygon needs at least 3 vertices"):
        store.update(i, kind="polygon")  # the kept coords must fit the new kind
    with pytest.raises(AnnotationError, match="unknown annotation kind"):
        store.update(i, kind="circle")
    with pytest.raises(AnnotationError, match=r"\[99\] do not exist"):
        store.update([i, 99], review="accepted")
    with pytest.raises(AnnotationError, match="2 coordinate arrays for 1 ids"):
        store.update([i], coords=[[[1, 1], [2, 2]], [[1, 1], [2, 2]]])
    store.update([i], coords=[[2, 2], [6, 6]])  # one id in a list, one (N, 2) array
    np.testing.assert_array_equal(store.get(i).coords, [[2, 2], [6, 6]])
    assert store.undo() == "edit"
    with pytest.raises(AnnotationError, match="unknown class 'x'"):
        store.update(i, class_name="x", allow_new_classes=False)
    with pytest.raises(AnnotationError, match=r"not .top, left, bottom, right"):
        store.query((10, 10, 0, 0))
    with pytest.raises(AnnotationError, match=r"plane \(1,\) does not fit"):
        store.query((0, 0, 10, 10), plane=(1,))
    np.testing.assert_array_equal(store.get(i).coords, [[1, 1], [5, 5]])
    assert [(h["label"], h["undone"]) for h in store.history()] == [
        ("add", False),
        ("edit", True),
    ]
