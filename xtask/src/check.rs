//! `cargo xtask check`: the structure rules the compiler does not enforce, checked on the
//! sources (ARCHITECTURE.md explains them):
//!
//! - at every level of every crate's module tree, sibling modules (each with its whole subtree)
//!   form a DAG: no import cycles;
//! - the daemon crate's top-level modules use only modules of their own or a lower layer;
//! - no Rust source file is longer than `MAX_LINES` lines, and each opens with a two-to-four
//!   line `//!` paragraph that says its one job.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use petgraph::{algo::tarjan_scc, graph::DiGraph};

use crate::{
    modtree::Tree,
    util::{cmd, output, root},
};

/// The longest a Rust source file may be.
pub const MAX_LINES: usize = 500;

/// Crate roots whose module trees are checked for cycles.
const ROOTS: &[&str] = &[
    "userspace/src/lib.rs",
    "userspace/src/main.rs",
    "userspace/tests/it/main.rs",
    "ebpf/src/main.rs",
    "common/src/lib.rs",
    "lab/src/lib.rs",
    "lab/src/main.rs",
    "lab/tests/it/main.rs",
    "xtask/src/main.rs",
];

/// The daemon crate's layers, lowest first: a module may use modules of its own layer (without
/// a cycle) or of a lower one, never of a higher one.
pub const LAYERS: &[(&str, &[&str])] = &[
    ("foundation", &["types", "time", "config", "db", "tasks"]),
    ("kernel", &["bpf"]),
    ("domain", &["webhook", "ledger", "selfcheck", "tokens", "steer", "registry", "identity"]),
    ("serving", &["control", "web", "api"]),
    ("top", &["daemon", "cli"]),
];
const LAYERED_CRATE: &str = "userspace/src/lib.rs";

pub fn check() -> Result<()> {
    let mut problems = Vec::new();
    let mut modules = 0;
    let mut edges = 0;
    for root_file in ROOTS {
        let path = root().join(root_file);
        if !path.exists() {
            problems.push(format!("{root_file}: crate root missing (update ROOTS in xtask/src/check.rs)"));
            continue;
        }
        let tree = Tree::read(&path)?;
        modules += tree.modules.iter().filter(|m| m.is_file).count();
        edges += tree.edges.len();
        problems.extend(cycles(&tree));
        if *root_file == LAYERED_CRATE {
            problems.extend(layers(&tree));
        }
    }
    problems.extend(files()?);
    if problems.is_empty() {
        println!(
            "xtask check: {} crates, {modules} modules, {edges} references: no import cycles, layers respected, \
             no file over {MAX_LINES} lines",
            ROOTS.len()
        );
        return Ok(());
    }
    for p in &problems {
        eprintln!("{p}");
    }
    bail!("{} structure problem(s) (see ARCHITECTURE.md)", problems.len())
}

/// For each module, the graph of its children (an edge A -> B when something in A's subtree
/// uses something in B's), and its cycles.
fn cycles(tree: &Tree) -> Vec<String> {
    // parent -> (child A, child B) -> example reference
    let mut levels: BTreeMap<usize, BTreeMap<(usize, usize), String>> = BTreeMap::new();
    for e in &tree.edges {
        let (a, b) = (ancestors(tree, e.from), ancestors(tree, e.to));
        // Containment (a module and its own ancestors or descendants) is not an edge.
        if a.contains(&e.to) || b.contains(&e.from) {
            continue;
        }
        let common = a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count();
        let parent = a[a.len() - common];
        let (ca, cb) = (a[a.len() - common - 1], b[b.len() - common - 1]);
        let why = format!("{} uses {}", tree.modules[e.from].file.display(), e.text);
        levels.entry(parent).or_default().entry((ca, cb)).or_insert(why);
    }
    let mut out = Vec::new();
    for (parent, pairs) in levels {
        let mut g = DiGraph::<usize, ()>::new();
        let mut nodes = BTreeMap::new();
        for &(a, b) in pairs.keys() {
            let na = *nodes.entry(a).or_insert_with(|| g.add_node(a));
            let nb = *nodes.entry(b).or_insert_with(|| g.add_node(b));
            g.add_edge(na, nb, ());
        }
        for scc in tarjan_scc(&g) {
            if scc.len() < 2 {
                continue;
            }
            let members: BTreeSet<usize> = scc.iter().map(|n| g[*n]).collect();
            let names: Vec<String> = members.iter().map(|m| tree.name(*m)).collect();
            let mut msg = format!(
                "{}: import cycle among the children of {}: {}",
                tree.modules[0].file.display(),
                tree.name(parent),
                names.join(", ")
            );
            for ((a, b), why) in &pairs {
                if members.contains(a) && members.contains(b) {
                    msg.push_str(&format!("\n    {} -> {}: {why}", tree.name(*a), tree.name(*b)));
                }
            }
            out.push(msg);
        }
    }
    out
}

/// `m` and its ancestors, `m` first, the root last.
fn ancestors(tree: &Tree, mut m: usize) -> Vec<usize> {
    let mut v = vec![m];
    while let Some(p) = tree.modules[m].parent {
        v.push(p);
        m = p;
    }
    v
}

fn layers(tree: &Tree) -> Vec<String> {
    let layer_of = |name: &str| LAYERS.iter().position(|(_, mods)| mods.contains(&name));
    let root = &tree.modules[0];
    let mut out = Vec::new();
    for name in root.children.keys() {
        if layer_of(name).is_none() {
            out.push(format!(
                "{}: module `{name}` has no layer (add it to LAYERS in xtask/src/check.rs)",
                LAYERED_CRATE
            ));
        }
    }
    let top = |m: usize| ancestors(tree, m).iter().rev().nth(1).map(|t| tree.modules[*t].path[0].clone());
    let mut seen = BTreeSet::new();
    for e in &tree.edges {
        let (Some(a), Some(b)) = (top(e.from), top(e.to)) else { continue };
        let (Some(la), Some(lb)) = (layer_of(&a), layer_of(&b)) else { continue };
        if lb > la && seen.insert((a.clone(), b.clone())) {
            out.push(format!(
                "{}: `{a}` ({}) uses `{b}` ({}), a higher layer: {} uses {}",
                LAYERED_CRATE,
                LAYERS[la].0,
                LAYERS[lb].0,
                tree.modules[e.from].file.display(),
                e.text
            ));
        }
    }
    out
}

/// Tracked and new Rust files: longer than `MAX_LINES`, or without their opening paragraph.
fn files() -> Result<Vec<String>> {
    let list = output(
        cmd("git").args(["ls-files", "--cached", "--others", "--exclude-standard", "*.rs"]).current_dir(root()),
    )?;
    let mut out = Vec::new();
    for f in list.lines() {
        let Ok(text) = std::fs::read_to_string(root().join(f)) else { continue };
        let n = text.lines().count();
        if n > MAX_LINES {
            out.push(format!("{f}: {n} lines, more than {MAX_LINES}: split it by what its parts do"));
        }
        let opening = text.lines().take_while(|l| l.starts_with("//!") && l.trim() != "//!").count();
        if !(2..=4).contains(&opening) {
            out.push(format!(
                "{f}: opens with {opening} line(s) of `//!`: say the module's one job in two to four lines"
            ));
        }
    }
    Ok(out)
}
