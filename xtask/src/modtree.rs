//! A crate's module tree read from its sources with `syn`, and every reference one module makes
//! to another: `use` trees, paths in code and paths inside macro calls, resolved the way rustc
//! resolves `crate::`, `super::`, `self::`, child modules and names imported from them.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// One module: a file, or an inline `mod name { ... }` inside a file.
pub struct Module {
    /// Path from the crate root (the root is empty).
    pub path: Vec<String>,
    pub file: PathBuf,
    pub parent: Option<usize>,
    pub children: BTreeMap<String, usize>,
    /// False for an inline module: its references count as its file's.
    pub is_file: bool,
    /// Names brought in by `use` that name crate modules or items: name -> absolute path.
    imports: HashMap<String, Vec<String>>,
    /// Raw references before resolution: (segments, what to show).
    raw: Vec<Vec<String>>,
}

/// A reference from one file module to another.
pub struct Edge {
    pub from: usize,
    pub to: usize,
    /// The path as written, for messages.
    pub text: String,
}

pub struct Tree {
    pub modules: Vec<Module>,
    pub edges: Vec<Edge>,
}

impl Tree {
    /// Read the crate whose root file is `root` (lib.rs, main.rs).
    pub fn read(root: &Path) -> Result<Tree> {
        let mut t = Tree { modules: Vec::new(), edges: Vec::new() };
        let file = parse(root)?;
        let dir = root.parent().expect("a file has a directory").to_path_buf();
        t.add(Vec::new(), root.to_path_buf(), None, true, &file.items, &dir)?;
        t.resolve();
        Ok(t)
    }

    /// The file module a module's references count for.
    pub fn file_of(&self, mut m: usize) -> usize {
        while !self.modules[m].is_file {
            m = self.modules[m].parent.expect("an inline module has a parent");
        }
        m
    }

    pub fn name(&self, m: usize) -> String {
        let p = &self.modules[m].path;
        if p.is_empty() { "crate".into() } else { p.join("::") }
    }

    fn add(
        &mut self,
        path: Vec<String>,
        file: PathBuf,
        parent: Option<usize>,
        is_file: bool,
        items: &[syn::Item],
        // Where this module's `mod x;` files are.
        child_dir: &Path,
    ) -> Result<usize> {
        let id = self.modules.len();
        self.modules.push(Module {
            path: path.clone(),
            file: file.clone(),
            parent,
            children: BTreeMap::new(),
            is_file,
            imports: HashMap::new(),
            raw: Vec::new(),
        });
        let mut refs = Refs::default();
        for item in items {
            match item {
                syn::Item::Mod(m) => {
                    let name = m.ident.to_string();
                    let mut child_path = path.clone();
                    child_path.push(name.clone());
                    let child = match &m.content {
                        Some((_, inner)) => {
                            self.add(child_path, file.clone(), Some(id), false, inner, &child_dir.join(&name))?
                        }
                        None => {
                            let f = mod_file(child_dir, &name)
                                .with_context(|| format!("{}: no file for `mod {name};`", file.display()))?;
                            let parsed = parse(&f)?;
                            let dir = if f.ends_with("mod.rs") {
                                f.parent().expect("dir").to_path_buf()
                            } else {
                                child_dir.join(&name)
                            };
                            self.add(child_path, f, Some(id), true, &parsed.items, &dir)?
                        }
                    };
                    self.modules[id].children.insert(name, child);
                }
                other => refs.visit_item(other),
            }
        }
        self.modules[id].raw = refs.paths;
        for (name, target) in refs.uses {
            self.modules[id].imports.insert(name, target);
        }
        Ok(id)
    }

    /// Resolve every raw reference to a module and record it as an edge between file modules.
    fn resolve(&mut self) {
        // Imports first, so that later paths can go through them (a `use` may name another).
        for m in 0..self.modules.len() {
            let imports: Vec<(String, Vec<String>)> = self.modules[m].imports.clone().into_iter().collect();
            let mut resolved = HashMap::new();
            for (name, segs) in imports {
                if let Some(abs) = self.absolute(m, &segs, false) {
                    resolved.insert(name, abs);
                }
            }
            self.modules[m].imports = resolved;
        }
        for m in 0..self.modules.len() {
            for segs in std::mem::take(&mut self.modules[m].raw) {
                let Some(abs) = self.absolute(m, &segs, true) else { continue };
                let target = self.deepest(&abs);
                let (from, to) = (self.file_of(m), self.file_of(target));
                if from != to {
                    self.edges.push(Edge { from, to, text: segs.join("::") });
                }
            }
        }
    }

    /// The absolute path `segs` names from module `m`, if it names something in this crate.
    fn absolute(&self, m: usize, segs: &[String], via_imports: bool) -> Option<Vec<String>> {
        let first = segs.first()?;
        let mut base = m;
        let mut rest = segs;
        match first.as_str() {
            "crate" => {
                base = 0;
                rest = &segs[1..];
            }
            "self" => rest = &segs[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    base = self.modules[base].parent?;
                    rest = &rest[1..];
                }
            }
            name if self.modules[m].children.contains_key(name) => {}
            name if via_imports => {
                let mut abs = self.modules[m].imports.get(name)?.clone();
                abs.extend(segs[1..].iter().cloned());
                return Some(abs);
            }
            _ => return None,
        }
        let mut abs = self.modules[base].path.clone();
        abs.extend(rest.iter().cloned());
        Some(abs)
    }

    /// The deepest module whose path is a prefix of `abs`.
    fn deepest(&self, abs: &[String]) -> usize {
        let mut m = 0;
        for s in abs {
            match self.modules[m].children.get(s) {
                Some(&c) => m = c,
                None => break,
            }
        }
        m
    }
}

fn parse(path: &Path) -> Result<syn::File> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    syn::parse_file(&text).with_context(|| format!("parsing {}", path.display()))
}

fn mod_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.rs")), dir.join(name).join("mod.rs")].into_iter().find(|p| p.is_file())
}

/// The references of one module's items (not of its child modules).
#[derive(Default)]
struct Refs {
    paths: Vec<Vec<String>>,
    /// `use` names: name -> path as written.
    uses: Vec<(String, Vec<String>)>,
}

impl Refs {
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_name(prefix, n.ident.to_string(), n.ident.to_string()),
            syn::UseTree::Rename(r) => self.use_name(prefix, r.ident.to_string(), r.rename.to_string()),
            syn::UseTree::Glob(_) => self.paths.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    fn use_name(&mut self, prefix: &[String], ident: String, alias: String) {
        let mut full = prefix.to_vec();
        if ident != "self" {
            full.push(ident);
        }
        self.paths.push(full.clone());
        if alias != "_" {
            let alias = if alias == "self" { full.last().cloned().unwrap_or_default() } else { alias };
            self.uses.push((alias, full));
        }
    }

    /// `a::b::c` sequences in macro input, e.g. `crate::time::unix_ms()` inside `json!`.
    fn tokens(&mut self, ts: TokenStream) {
        let tokens: Vec<TokenTree> = ts.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(first) => {
                    let mut segs = vec![first.to_string()];
                    let mut j = i + 1;
                    let colon = |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Punct(p)) if p.as_char() == ':');
                    while colon(tokens.get(j)) && colon(tokens.get(j + 1)) {
                        let Some(TokenTree::Ident(id)) = tokens.get(j + 2) else { break };
                        segs.push(id.to_string());
                        j += 3;
                    }
                    if segs.len() > 1 {
                        self.paths.push(segs);
                    }
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Refs {
    fn visit_item_mod(&mut self, _: &'ast syn::ItemMod) {
        // Child modules are modules of their own (handled by `Tree::add`).
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments.len() > 1 {
            self.paths.push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.visit_path(&m.path);
        self.tokens(m.tokens.clone());
    }
}
