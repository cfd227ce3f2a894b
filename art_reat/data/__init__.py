"""Data: long-tailed subsets, stratified splits, dataset registry and an on-device loader."""

from art_reat.data.augment import AUGMENT_POLICIES, BatchAutoAugment, build_augment_policy
from art_reat.data.datasets import DATASETS, DatasetSplits, load_dataset, read_npz, validate_arrays, write_npz
from art_reat.data.loader import DeviceLoader, random_crop_flip
from art_reat.data.longtail import balanced_small_indices, class_groups, long_tailed_counts, long_tailed_indices
from art_reat.data.splits import proportional_subset, stratified_split, stratified_subset

__all__ = [
    "AUGMENT_POLICIES",
    "BatchAutoAugment",
    "build_augment_policy",
    "DATASETS",
    "DatasetSplits",
    "DeviceLoader",
    "balanced_small_indices",
    "class_groups",
    "load_dataset",
    "long_tailed_counts",
    "long_tailed_indices",
    "proportional_subset",
    "random_crop_flip",
    "read_npz",
    "stratified_split",
    "stratified_subset",
    "validate_arrays",
    "write_npz",
]
