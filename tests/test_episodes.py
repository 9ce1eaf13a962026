"""Specification of tf_mamlpp.data.episodes."""

import pathlib

import numpy as np
import pytest

from tf_mamlpp.data.class_images import from_class_arrays
from tf_mamlpp.data.episodes import EpisodeSpec, episode_dataset
from tf_mamlpp.data.omniglot import load_omniglot, num_background_classes, split_classes

OMNIGLOT_DIR = pathlib.Path(__file__).resolve().parents[1] / "datasets" / "omniglot"
COUNTS = (5, 9, 7, 12, 6, 8, 10)  # images per class, all different
SIDE = 4
SPEC = EpisodeSpec(way=3, shot=2, query=2)


@pytest.fixture(scope="module")
def synthetic():
    """Classes of different sizes whose images name themselves.

    Every image is a distinct ramp with no rotational symmetry, so any image
    a task holds identifies (image id, quarter turns) exactly.
    """
    ramp = np.arange(SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE, 1)
    total = sum(COUNTS)
    offsets = SIDE * SIDE * np.arange(total, dtype=np.float32)[:, None, None, None]
    images = (ramp + offsets) / (SIDE * SIDE * total)
    starts = np.cumsum(COUNTS) - COUNTS
    arrays = [images[start:start + count] for start, count in zip(starts, COUNTS)]
    return from_class_arrays(arrays, [f"class{c}" for c in range(len(COUNTS))])


@pytest.fixture(scope="module")
def identify(synthetic):
    """image -> (class, image id, quarter turns) for every rotation of every image."""
    class_of = np.repeat(np.arange(len(COUNTS)), COUNTS)
    table = {np.rot90(image, turns).tobytes(): (class_of[i], i, turns)
             for i, image in enumerate(synthetic.images) for turns in range(4)}
    return lambda image: table[np.asarray(image).tobytes()]


def tasks(dataset, limit=None):
    """The tasks of a dataset, one dict of numpy arrays each, in order."""
    result = []
    for batch in dataset:
        batch = {key: value.numpy() for key, value in batch.items()}
        result += [{key: value[i] for key, value in batch.items()}
                   for i in range(len(batch["support_labels"]))]
        if limit is not None and len(result) >= limit:
            return result[:limit]
    return result


def described(task, identify):
    """Per image of support then target: (label, class, image id, quarter turns)."""
    rows = []
    for kind in ("support", "target"):
        for image, label in zip(task[f"{kind}_images"], task[f"{kind}_labels"]):
            rows.append((label, *identify(image)))
    return rows


def synthetic_tasks(synthetic, num_tasks=40, augment=False, seed=0, spec=SPEC, start_index=0):
    return tasks(episode_dataset(synthetic, spec, tasks_per_batch=4, seed=seed, augment=augment,
                                 start_index=start_index, num_tasks=num_tasks))


def test_batches_have_the_promised_shapes_and_dtypes(synthetic):
    dataset = episode_dataset(synthetic, SPEC, tasks_per_batch=4, seed=0, augment=True)
    batch = next(iter(dataset))
    assert batch["support_images"].shape == (4, 3 * 2, SIDE, SIDE, 1)
    assert batch["target_images"].shape == (4, 3 * 2, SIDE, SIDE, 1)
    assert batch["support_labels"].shape == batch["target_labels"].shape == (4, 6)
    assert batch["support_images"].dtype.name == "float32"
    assert batch["support_labels"].dtype.name == batch["target_labels"].dtype.name == "int32"


def test_each_label_appears_shot_times_in_support_and_query_times_in_target(synthetic):
    spec = EpisodeSpec(way=4, shot=3, query=1)
    for task in synthetic_tasks(synthetic, spec=spec):
        np.testing.assert_array_equal(np.bincount(task["support_labels"]), [3] * 4)
        np.testing.assert_array_equal(np.bincount(task["target_labels"]), [1] * 4)


def test_a_task_has_one_class_per_label_and_no_image_twice(synthetic, identify):
    for task in synthetic_tasks(synthetic):
        rows = described(task, identify)
        class_of_label = {label: cls for label, cls, _, _ in rows}
        assert all(class_of_label[label] == cls for label, cls, _, _ in rows)
        assert len(set(class_of_label.values())) == SPEC.way
        image_ids = [image_id for _, _, image_id, _ in rows]
        assert len(set(image_ids)) == len(image_ids)  # support and target disjoint


def test_labels_are_a_fresh_permutation_of_the_drawn_classes(synthetic, identify):
    first_two = set()
    for task in synthetic_tasks(synthetic):
        class_of_label = {label: cls for label, cls, _, _ in described(task, identify)}
        first_two.add(class_of_label[0] < class_of_label[1])
    assert first_two == {True, False}


def test_every_image_of_every_class_gets_drawn(synthetic, identify):
    spec = EpisodeSpec(way=4, shot=2, query=3)  # 5 per class: all of the smallest class
    drawn = {image_id for task in synthetic_tasks(synthetic, 200, spec=spec)
             for _, _, image_id, _ in described(task, identify)}
    assert drawn == set(range(sum(COUNTS)))


def test_without_augment_images_are_exact_images_of_their_class(synthetic, identify):
    for task in synthetic_tasks(synthetic, augment=False):
        assert all(turns == 0 for *_, turns in described(task, identify))


def test_with_augment_each_class_turns_as_a_whole(synthetic, identify):
    seen_turns = set()
    for task in synthetic_tasks(synthetic, augment=True):
        turns_of_label = {}
        for label, _, _, turns in described(task, identify):
            assert turns_of_label.setdefault(label, turns) == turns
        seen_turns.update(turns_of_label.values())
    assert seen_turns == {0, 1, 2, 3}


def test_augment_changes_no_class_or_image_choice(synthetic, identify):
    plain = synthetic_tasks(synthetic, augment=False)
    turned = synthetic_tasks(synthetic, augment=True)
    for a, b in zip(plain, turned):
        assert [row[:3] for row in described(a, identify)] == [
            row[:3] for row in described(b, identify)]


def test_a_seed_fixes_the_stream_and_another_seed_changes_it(synthetic):
    first, again = synthetic_tasks(synthetic, 8, seed=5), synthetic_tasks(synthetic, 8, seed=5)
    other = synthetic_tasks(synthetic, 8, seed=6)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["support_images"], b["support_images"])
        np.testing.assert_array_equal(a["target_images"], b["target_images"])
    assert not all(np.array_equal(a["support_images"], c["support_images"])
                   for a, c in zip(first, other))


def test_start_index_resumes_a_finite_stream(synthetic):
    whole = synthetic_tasks(synthetic, num_tasks=9, augment=True)
    resumed = synthetic_tasks(synthetic, num_tasks=9, augment=True, start_index=4)
    assert len(resumed) == 5
    for a, b in zip(whole[4:], resumed):
        np.testing.assert_array_equal(a["support_images"], b["support_images"])
        np.testing.assert_array_equal(a["target_images"], b["target_images"])


def test_start_index_resumes_an_endless_stream(synthetic):
    def endless(start_index):
        return tasks(episode_dataset(synthetic, SPEC, tasks_per_batch=3, seed=1, augment=True,
                                     start_index=start_index), limit=6)
    whole, resumed = endless(0), endless(3)
    for a, b in zip(whole[3:], resumed[:3]):
        np.testing.assert_array_equal(a["support_images"], b["support_images"])


def test_a_finite_set_has_exactly_num_tasks_with_the_last_batch_partial(synthetic):
    dataset = episode_dataset(synthetic, SPEC, tasks_per_batch=3, seed=0, augment=False,
                              num_tasks=7)
    assert [len(batch["support_labels"]) for batch in dataset] == [3, 3, 1]
    first, again = tasks(dataset), tasks(dataset)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["target_images"], b["target_images"])


@pytest.mark.parametrize("way, shot, query, batch_size, flag", [
    (0, 1, 1, 2, "way=0"),
    (8, 1, 1, 2, "way=8"),  # 7 classes
    (2, 0, 1, 2, "shot=0"),
    (2, 1, -1, 2, "query=-1"),
    (2, 3, 3, 2, "shot=3 plus query=3"),  # the smallest class has 5 images
    (2, 1, 1, 0, "tasks_per_batch=0"),
])
def test_impossible_counts_raise_naming_the_flag(synthetic, way, shot, query, batch_size, flag):
    with pytest.raises(ValueError, match=flag) as error:
        episode_dataset(synthetic, EpisodeSpec(way, shot, query), batch_size, seed=0,
                        augment=False)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def omniglot_train():
    if not (OMNIGLOT_DIR / "images_background.zip").is_file():
        pytest.fail(f"the shipped Omniglot archives are missing from {OMNIGLOT_DIR}")
    omniglot = load_omniglot(OMNIGLOT_DIR)
    train = split_classes(num_background_classes(omniglot), omniglot.num_classes)["train"]
    return omniglot.select(train)


def test_omniglot_tasks_hold_distinct_images_of_one_class_per_label(omniglot_train):
    class_of = np.repeat(np.arange(omniglot_train.num_classes), omniglot_train.class_counts)
    class_of_bytes = {image.tobytes(): cls for image, cls in zip(omniglot_train.images, class_of)}
    spec = EpisodeSpec(way=20, shot=5, query=1)
    dataset = episode_dataset(omniglot_train, spec, tasks_per_batch=2, seed=0, augment=False,
                              num_tasks=4)
    for task in tasks(dataset):
        images = np.concatenate([task["support_images"], task["target_images"]])
        labels = np.concatenate([task["support_labels"], task["target_labels"]])
        classes = [class_of_bytes[image.tobytes()] for image in images]  # exact class images
        class_of_label = dict(zip(labels, classes))
        assert all(class_of_label[label] == cls for label, cls in zip(labels, classes))
        assert len(set(class_of_label.values())) == spec.way
        assert len({image.tobytes() for image in images}) == len(images)
