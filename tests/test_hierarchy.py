"""The class tree: strictness checks, round trip, the flat tree and the rendering."""

from __future__ import annotations

import json
import re

import pytest

from imfree.errors import ConfigError
from imfree.toolkit.hierarchy import Hierarchy, load_hierarchy

CLASSES = ["cat", "dog", "person", "car", "bus"]
TREE = {
    "fine": {"pets": ["cat", "dog"], "people": ["person"], "vehicles": ["car", "bus"]},
    "coarse": {"home": ["pets", "people"], "street": ["vehicles"]},
}


def tree(**changes):
    data = json.loads(json.dumps(TREE))
    for level, groups in changes.items():
        data[level] = groups
    return data


def test_strict_tree_is_accepted():
    hierarchy = Hierarchy.from_dict(CLASSES, TREE)
    assert hierarchy.classes == tuple(CLASSES)
    assert hierarchy.fine_names == ("pets", "people", "vehicles")
    assert hierarchy.coarse_names == ("home", "street")
    assert hierarchy.fine_of_class == (0, 0, 1, 2, 2)
    assert hierarchy.coarse_of_fine == (0, 0, 1)
    assert hierarchy.coarse_of_class == (0, 0, 0, 1, 1)


def test_class_in_two_fine_groups_is_refused():
    data = tree(fine={"pets": ["cat", "dog"], "people": ["person", "dog"],
                      "vehicles": ["car", "bus"]})
    with pytest.raises(ConfigError, match=r"class 'dog'.*two fine groups"):
        Hierarchy.from_dict(CLASSES, data)


def test_fine_group_in_two_coarse_groups_is_refused():
    data = tree(coarse={"home": ["pets", "people"], "street": ["vehicles", "pets"]})
    with pytest.raises(ConfigError, match=r"fine group 'pets'.*two coarse groups"):
        Hierarchy.from_dict(CLASSES, data)


def test_class_in_no_group_is_refused_with_its_name():
    data = tree(fine={"pets": ["cat", "dog"], "vehicles": ["car", "bus"]},
                coarse={"home": ["pets"], "street": ["vehicles"]})
    with pytest.raises(ConfigError, match=r"person.*no fine group"):
        Hierarchy.from_dict(CLASSES, data)


def test_all_missing_classes_are_named():
    data = tree(fine={"pets": ["cat", "dog"]}, coarse={"home": ["pets"]})
    with pytest.raises(ConfigError) as caught:
        Hierarchy.from_dict(CLASSES, data)
    assert all(name in str(caught.value) for name in ("person", "car", "bus"))


def test_fine_group_in_no_coarse_group_is_refused():
    data = tree(coarse={"home": ["pets", "people"]})
    with pytest.raises(ConfigError, match=r"vehicles.*no coarse group"):
        Hierarchy.from_dict(CLASSES, data)


def test_unknown_class_is_refused_with_group_and_name():
    data = tree(fine={"pets": ["cat", "dog", "unicorn"], "people": ["person"],
                      "vehicles": ["car", "bus"]})
    with pytest.raises(ConfigError, match=r"fine group 'pets'.*unknown class 'unicorn'"):
        Hierarchy.from_dict(CLASSES, data)


def test_unknown_fine_group_in_coarse_group_is_refused():
    data = tree(coarse={"home": ["pets", "people", "boats"], "street": ["vehicles"]})
    with pytest.raises(ConfigError, match=r"coarse group 'home'.*unknown fine group 'boats'"):
        Hierarchy.from_dict(CLASSES, data)


@pytest.mark.parametrize("data", [{}, {"fine": TREE["fine"]}, {"fine": [], "coarse": {}}])
def test_missing_levels_are_refused(data):
    with pytest.raises(ConfigError, match="'fine' and 'coarse'"):
        Hierarchy.from_dict(CLASSES, data)


def test_error_names_the_source_file(tmp_path):
    path = tmp_path / "hierarchy.json"
    path.write_text(json.dumps(tree(coarse={"home": ["pets", "people"]})))
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_hierarchy(path, CLASSES)


def test_unreadable_file_is_a_config_error(tmp_path):
    path = tmp_path / "hierarchy.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read hierarchy"):
        load_hierarchy(path, CLASSES)


def test_to_dict_round_trip():
    hierarchy = Hierarchy.from_dict(CLASSES, TREE)
    assert hierarchy.to_dict() == TREE
    assert Hierarchy.from_dict(CLASSES, hierarchy.to_dict()) == hierarchy


def test_round_trip_survives_json():
    hierarchy = Hierarchy.from_dict(CLASSES, TREE)
    again = Hierarchy.from_dict(CLASSES, json.loads(json.dumps(hierarchy.to_dict())))
    assert again == hierarchy


def test_flat_tree_puts_every_class_under_one_node():
    flat = Hierarchy.flat(CLASSES)
    assert flat.fine_names == ("all",) and flat.coarse_names == ("all",)
    assert flat.fine_of_class == (0,) * len(CLASSES)
    assert flat.coarse_of_class == (0,) * len(CLASSES)
    assert flat.to_dict() == {"fine": {"all": CLASSES}, "coarse": {"all": ["all"]}}
    assert Hierarchy.from_dict(CLASSES, flat.to_dict()) == flat


def test_render():
    text = Hierarchy.from_dict(CLASSES, TREE).render()
    assert text == "\n".join([
        "root",
        "  home",
        "    pets: cat, dog",
        "    people: person",
        "  street",
        "    vehicles: car, bus",
    ])
