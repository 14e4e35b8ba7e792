//! What one suite put in the kernel, by id: the programs attached in its own cgroup subtrees or
//! held by its own pins, and the maps those programs use or its pins hold. Suites check these —
//! "still there" while the hooks must stay, "gone" after an uninstall — rather than every `nm_*`
//! program on the machine, so a demo or an operator's daemon running beside them changes nothing.
//! `cargo xtask leftovers`, run alone, is the machine-wide check (xtask/src/main.rs).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Program and map ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub progs: BTreeSet<u32>,
    pub maps: BTreeSet<u32>,
}

/// `bpftool -j <args>` parsed (bpftool is installed by `cargo xtask setup`).
fn bpftool(args: &[&str]) -> Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = crate::sh("bpftool", &all);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bpftool {args:?}: not JSON ({e}): {text}"))
}

fn id(v: &Value, key: &str) -> Option<u32> {
    v.get(key)?.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// Whether any of a JSON object's `pinned` paths lies under one of `dirs`.
fn pinned_under(v: &Value, dirs: &[PathBuf]) -> bool {
    v.get("pinned")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|p| dirs.iter().any(|d| Path::new(p).starts_with(d)))
}

/// Every program id attached somewhere in `cgroup tree`'s output (its shape differs between
/// bpftool versions: objects with an `attach_type` carry the program's `id`).
fn attached_ids(v: &Value, out: &mut BTreeSet<u32>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| attached_ids(x, out)),
        Value::Object(o) => {
            if o.contains_key("attach_type")
                && let Some(i) = id(v, "id")
            {
                out.insert(i);
            }
            o.values().for_each(|x| attached_ids(x, out));
        }
        _ => {}
    }
}

impl Footprint {
    /// What is attached under `cgroup_roots` and pinned under `pin_dirs` now (with the maps those
    /// programs use).
    pub fn of(cgroup_roots: &[&Path], pin_dirs: &[&Path]) -> Self {
        let dirs: Vec<PathBuf> = pin_dirs
            .iter()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()))
            .collect();
        let mut f = Self::default();
        for root in cgroup_roots.iter().filter(|r| r.exists()) {
            attached_ids(
                &bpftool(&["cgroup", "tree", &root.to_string_lossy()]),
                &mut f.progs,
            );
        }
        // The `key` id of every object in a `bpftool -f <what> show` listing pinned under `dirs`.
        let pinned = |list: &Value, key: &str| -> Vec<u32> {
            list.as_array()
                .into_iter()
                .flatten()
                .filter(|o| pinned_under(o, &dirs))
                .filter_map(|o| id(o, key))
                .collect()
        };
        let progs = bpftool(&["-f", "prog", "show"]);
        f.progs
            .extend(pinned(&bpftool(&["-f", "link", "show"]), "prog_id"));
        f.progs.extend(pinned(&progs, "id"));
        f.maps
            .extend(pinned(&bpftool(&["-f", "map", "show"]), "id"));
        for prog in progs.as_array().into_iter().flatten() {
            if id(prog, "id").is_some_and(|p| f.progs.contains(&p)) {
                f.maps.extend(
                    prog.get("map_ids")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.as_u64().and_then(|n| u32::try_from(n).ok())),
                );
            }
        }
        f
    }

    pub fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.maps.is_empty()
    }

    /// The part of this footprint the kernel still holds.
    pub fn still_loaded(&self) -> Self {
        let ids = |v: Value| -> BTreeSet<u32> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| id(x, "id"))
                .collect()
        };
        let progs = ids(bpftool(&["prog", "show"]));
        let maps = ids(bpftool(&["map", "show"]));
        Self {
            progs: self.progs.intersection(&progs).copied().collect(),
            maps: self.maps.intersection(&maps).copied().collect(),
        }
    }

    /// Panics unless every program and map of this footprint is gone from the kernel.
    pub fn assert_gone(&self, what: &str) {
        let left = self.still_loaded();
        assert!(
            left.is_empty(),
            "{what}: still loaded of ours: programs {:?}, maps {:?} (of {:?} / {:?})",
            left.progs,
            left.maps,
            self.progs,
            self.maps
        );
    }
}

/// Files left under a pin folder (empty after a clean uninstall).
pub fn pins_left(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
