//! The `Dockerfile` checked against what cargo reads, without a Docker engine.
//!
//! The build stages are replayed on paper: which files of the build context each `COPY` puts
//! where (minus `.dockerignore`), which stubs a `RUN` writes (`echo … > FILE`, `touch`) or
//! deletes (`rm`), what `cargo chef prepare` records and `cargo chef cook` compiles. Every
//! `cargo` run must then find what it reads where it runs:
//!
//! - any `cargo build`: `Cargo.toml`, `Cargo.lock`, the build script (and the inputs it names
//!   with `rerun-if-changed`, when it is the real one) and the file of every target the manifest
//!   declares (`[[bin]]`, `[[bench]]`, `[[test]]`, `[[example]]`, the library): cargo refuses a
//!   manifest whose declared target has no file, even when building another target;
//! - the build whose binaries the image ships, and `cargo chef prepare` (whose recipe must know
//!   every target): all of that as the real files, plus the whole `src/` tree and every file
//!   `include_str!`/`include_bytes!` reach outside it;
//! - `cargo chef cook`: the recipe and nothing else from the context (or its layer is rebuilt on
//!   every change), with the same profile, `--locked` and binaries as the build after it
//!   (otherwise the cooked layer is compiled for nothing).
//!
//! The final image must ship every `[[bin]]` from the build that made it, run as the chart's
//! numeric non-root uid, expose the chart's default ports, and run on the Debian release the
//! binaries were linked on.
//!
//! The checker is tested too: the placeholder Dockerfile this one replaced (which named two of
//! the four benches) and a few other broken variants must each be refused, naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------ what cargo reads

/// Files (paths relative to the crate root, `/`-separated) that cargo reads.
struct Needs {
    /// Read by any cargo command on this manifest.
    manifest: BTreeSet<String>,
    /// Read when the real build script runs.
    build_inputs: BTreeSet<String>,
    /// The real build script, if any.
    build_script: Option<String>,
    /// Everything the real build compiles: the above, `src/`, and files included from outside it.
    sources: BTreeSet<String>,
    /// The binaries the package declares.
    bins: BTreeSet<String>,
}

fn files_under(root: &Path, rel: &str) -> Vec<String> {
    let path = root.join(rel);
    if path.is_file() {
        return vec![rel.to_owned()];
    }
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&path) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.extend(files_under(root, &format!("{rel}/{name}")));
        }
    }
    out.sort();
    out
}

/// Where cargo looks for a target with no `path`: `DIR/NAME.rs`, or `DIR/NAME/main.rs`.
fn inferred_target(root: &Path, dir: &str, name: &str) -> String {
    let dir_form = format!("{dir}/{name}/main.rs");
    if root.join(&dir_form).is_file() {
        dir_form
    } else {
        format!("{dir}/{name}.rs")
    }
}

fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn rust_files(root: &Path, rel: &str) -> Vec<String> {
    files_under(root, rel)
        .into_iter()
        .filter(|f| f.ends_with(".rs"))
        .collect()
}

/// String literals passed to `include_str!`/`include_bytes!` in a Rust file.
fn included_files(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for mac in ["include_str!(\"", "include_bytes!(\""] {
        let mut rest = text;
        while let Some(at) = rest.find(mac) {
            rest = &rest[at + mac.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_owned());
            }
        }
    }
    out
}

fn needs(root: &Path) -> Needs {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("Cargo.toml parses");
    let package = manifest["package"].as_table().expect("[package]");
    let package_name = package["name"].as_str().expect("package.name");
    let mut files = BTreeSet::from(["Cargo.toml".to_owned(), "Cargo.lock".to_owned()]);

    let build_script = match package.get("build") {
        Some(toml::Value::String(path)) => Some(normalize(path)),
        Some(toml::Value::Boolean(false)) => None,
        _ => root
            .join("build.rs")
            .is_file()
            .then(|| "build.rs".to_owned()),
    };
    let mut build_inputs = BTreeSet::new();
    if let Some(script) = &build_script {
        files.insert(script.clone());
        let body = std::fs::read_to_string(root.join(script)).expect("the build script");
        for marker in ["cargo:rerun-if-changed=", "cargo::rerun-if-changed="] {
            for (at, _) in body.match_indices(marker) {
                let value = &body[at + marker.len()..];
                let end = value.find(['"', '\n', '\\', '{']).unwrap_or(value.len());
                build_inputs.extend(files_under(root, &normalize(&value[..end])));
            }
        }
    }

    let lib = manifest
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str())
        .map(normalize)
        .or_else(|| {
            root.join("src/lib.rs")
                .is_file()
                .then(|| "src/lib.rs".into())
        });
    files.extend(lib);

    let mut bins = BTreeSet::new();
    for (key, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        let Some(targets) = manifest.get(key).and_then(|t| t.as_array()) else {
            continue;
        };
        for target in targets {
            let name = target["name"].as_str().expect("a target has a name");
            let path = match target.get("path").and_then(|p| p.as_str()) {
                Some(path) => normalize(path),
                None if key == "bin" && name == package_name => "src/main.rs".into(),
                None => inferred_target(root, dir, name),
            };
            files.insert(path);
            if key == "bin" {
                bins.insert(name.to_owned());
            }
        }
    }

    let mut sources: BTreeSet<String> = files.iter().cloned().collect();
    sources.extend(build_inputs.iter().cloned());
    sources.extend(files_under(root, "src"));
    for file in rust_files(root, "src") {
        let body = std::fs::read_to_string(root.join(&file)).unwrap_or_default();
        let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
        for included in included_files(&body) {
            sources.insert(normalize(&format!("{dir}/{included}")));
        }
    }
    Needs {
        manifest: files,
        build_inputs,
        build_script,
        sources,
        bins,
    }
}

// ------------------------------------------------------------------ .dockerignore

/// `.dockerignore` rules: a path is left out of the context when the last pattern matching it,
/// or one of its parent directories, is not a `!` exception.
struct Ignore {
    rules: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    fn parse(text: &str) -> Ignore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (keep, pattern) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let segments = normalize(pattern).split('/').map(str::to_owned).collect();
                (keep, segments)
            })
            .collect();
        Ignore { rules }
    }

    fn excludes(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for (keep, pattern) in &self.rules {
            let hit = (1..=parts.len()).any(|n| glob_path(pattern, &parts[..n]));
            if hit {
                excluded = !keep;
            }
        }
        excluded
    }
}

fn glob_path(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| glob_path(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, tail)) => {
                glob_segment(first.as_bytes(), segment.as_bytes()) && glob_path(rest, tail)
            }
            None => false,
        },
    }
}

fn glob_segment(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| glob_segment(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && glob_segment(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && glob_segment(rest, &text[1..]),
    }
}

// ------------------------------------------------------------------ Dockerfile syntax

#[derive(Debug, Clone)]
enum Instruction {
    Workdir(String),
    Copy {
        from: Option<String>,
        sources: Vec<String>,
        dest: String,
    },
    Run(String),
    User(String),
    Expose(Vec<String>),
    Env(Vec<(String, String)>),
    Entrypoint(Vec<String>),
    Other,
}

#[derive(Debug)]
struct Stage {
    name: Option<String>,
    base: String,
    instructions: Vec<(usize, Instruction)>,
}

/// Words of a shell command line: quotes group, operators (`&&`, `||`, `;`, `|`, `>`, `>>`)
/// stand alone.
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    word.push(q);
                }
            }
            '&' | '|' | ';' | '>' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                let mut op = c.to_string();
                if matches!(
                    (c, chars.peek()),
                    ('&', Some('&')) | ('|', Some('|')) | ('>', Some('>'))
                ) {
                    op.push(chars.next().unwrap());
                }
                words.push(op);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The arguments of an instruction: a JSON array, or words.
fn arguments(rest: &str) -> Vec<String> {
    let rest = rest.trim();
    if rest.starts_with('[')
        && let Ok(list) = serde_json::from_str::<Vec<String>>(rest)
    {
        return list;
    }
    shell_words(rest)
}

fn parse_dockerfile(text: &str) -> Vec<Stage> {
    // Logical lines: comments dropped (also inside continuations), `\` joins.
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (start, mut line) = pending.take().unwrap_or((i + 1, String::new()));
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                line.push_str(part);
                line.push(' ');
                pending = Some((start, line));
            }
            None => {
                line.push_str(trimmed);
                lines.push((start, line));
            }
        }
    }
    if let Some(p) = pending {
        lines.push(p);
    }

    let mut stages: Vec<Stage> = Vec::new();
    for (line, text) in lines {
        let (keyword, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<String> = shell_words(rest)
                .into_iter()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.clone()),
                _ => None,
            };
            stages.push(Stage {
                name,
                base: words.first().cloned().unwrap_or_default(),
                instructions: Vec::new(),
            });
            continue;
        }
        let Some(stage) = stages.last_mut() else {
            continue; // ARG before the first FROM
        };
        let instruction = match keyword.as_str() {
            "WORKDIR" => Instruction::Workdir(rest.trim().to_owned()),
            "COPY" | "ADD" => {
                let mut words = arguments(rest);
                let mut from = None;
                words.retain(|w| {
                    if let Some(stage) = w.strip_prefix("--from=") {
                        from = Some(stage.to_owned());
                    }
                    !w.starts_with("--")
                });
                let dest = words.pop().unwrap_or_default();
                Instruction::Copy {
                    from,
                    sources: words,
                    dest,
                }
            }
            "RUN" => {
                // Leading options (--mount=…, --network=…) are not part of the command.
                let mut command = rest.trim();
                while command.starts_with("--") {
                    command = command
                        .split_once(char::is_whitespace)
                        .map_or("", |(_, r)| r.trim_start());
                }
                Instruction::Run(command.to_owned())
            }
            "USER" => Instruction::User(rest.trim().to_owned()),
            "EXPOSE" => Instruction::Expose(shell_words(rest)),
            "ENV" => {
                let words = shell_words(rest);
                let pairs = if words.first().is_some_and(|w| !w.contains('=')) {
                    vec![(words[0].clone(), words[1..].join(" "))]
                } else {
                    words
                        .iter()
                        .filter_map(|w| w.split_once('='))
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                };
                Instruction::Env(pairs)
            }
            "ENTRYPOINT" => Instruction::Entrypoint(arguments(rest)),
            _ => Instruction::Other,
        };
        stage.instructions.push((line, instruction));
    }
    stages
}

// ------------------------------------------------------------------ replaying the stages

#[derive(Debug, Clone)]
enum Op {
    /// COPY from the build context: sources relative to the context, destination absolute;
    /// `into` when files go into the destination directory rather than onto it.
    Context {
        sources: Vec<String>,
        dest: String,
        into: bool,
    },
    Stub(String),
    Remove(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    Absent,
    Stub,
    Real,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CargoFlags {
    workdir: String,
    profile: String,
    locked: bool,
    bins: BTreeSet<String>,
}

#[derive(Debug, Clone, Default)]
struct State {
    workdir: String,
    ops: Vec<Op>,
    /// Absolute paths of files that cargo built or that were copied from another stage.
    outputs: BTreeSet<String>,
    /// Where a recipe made by a complete `cargo chef prepare` lies in this stage.
    recipe: Option<String>,
    cook: Option<(usize, CargoFlags)>,
}

#[derive(Debug)]
struct Build {
    stage: usize,
    line: usize,
    flags: CargoFlags,
    /// Files any cargo run needs, neither copied nor stubbed.
    missing: Vec<String>,
    /// Files the shipped build needs, not there as the real file.
    not_real: Vec<String>,
}

struct Context<'a> {
    root: &'a Path,
    ignore: &'a Ignore,
    needs: &'a Needs,
}

fn absolute(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        format!("/{}", normalize(path))
    } else {
        format!("/{}", normalize(&format!("{workdir}/{path}")))
    }
}

fn basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

/// Does COPY put its files into `dest` (a directory) rather than onto it?
fn copies_into(dest: &str, sources: usize) -> bool {
    sources > 1 || dest.ends_with('/') || dest.ends_with("/.") || dest == "."
}

/// Where COPY (or cp) puts a file source, `dest` being absolute.
fn copy_target(dest: &str, source: &str, into: bool) -> String {
    if into {
        format!("{}/{}", dest.trim_end_matches('/'), basename(source))
    } else {
        dest.to_owned()
    }
}

impl Context<'_> {
    /// Is the file at absolute path `abs` there after `ops`, and is it the real one?
    fn presence(&self, ops: &[Op], abs: &str) -> Presence {
        let mut presence = Presence::Absent;
        for op in ops {
            match op {
                Op::Context {
                    sources,
                    dest,
                    into,
                } => {
                    for source in sources {
                        let source = normalize(source);
                        let from_dir = source.is_empty() || self.root.join(&source).is_dir();
                        let context_path = if from_dir {
                            // A directory's contents land under the destination.
                            let dest = dest.trim_end_matches('/');
                            abs.strip_prefix(dest)
                                .and_then(|r| r.strip_prefix('/'))
                                .map(|r| normalize(&format!("{source}/{r}")))
                        } else {
                            let target = copy_target(dest, &source, *into);
                            (normalize(&target) == normalize(abs)).then(|| source.clone())
                        };
                        if let Some(path) = context_path
                            && self.root.join(&path).is_file()
                            && !self.ignore.excludes(&path)
                        {
                            presence = Presence::Real;
                        }
                    }
                }
                Op::Stub(path) if path == abs => presence = Presence::Stub,
                Op::Remove(path) if abs == path || abs.starts_with(&format!("{path}/")) => {
                    presence = Presence::Absent;
                }
                _ => {}
            }
        }
        presence
    }

    fn missing<'n>(
        &self,
        state: &State,
        files: impl Iterator<Item = &'n String>,
        real_only: bool,
    ) -> Vec<String> {
        files
            .filter(|f| {
                let p = self.presence(&state.ops, &absolute(&state.workdir, f));
                p == Presence::Absent || (real_only && p != Presence::Real)
            })
            .cloned()
            .collect()
    }
}

fn cargo_flags(workdir: &str, words: &[String]) -> CargoFlags {
    let mut flags = CargoFlags {
        workdir: workdir.to_owned(),
        profile: "dev".into(),
        locked: false,
        bins: BTreeSet::new(),
    };
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let value = || words.get(i + 1).cloned().unwrap_or_default();
        match w {
            "--release" => flags.profile = "release".into(),
            "--locked" | "--frozen" => flags.locked = true,
            "--profile" => flags.profile = value(),
            "--bin" => {
                flags.bins.insert(value());
            }
            _ => {
                if let Some(v) = w.strip_prefix("--profile=") {
                    flags.profile = v.into();
                } else if let Some(v) = w.strip_prefix("--bin=") {
                    flags.bins.insert(v.into());
                }
            }
        }
        i += 1;
    }
    flags
}

fn option_value(words: &[String], name: &str) -> Option<String> {
    let eq = format!("{name}=");
    words.iter().enumerate().find_map(|(i, w)| {
        if w == name {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

struct Replay {
    stages: Vec<Stage>,
    states: Vec<State>,
    builds: Vec<Build>,
    problems: Vec<String>,
}

fn stage_index(stages: &[Stage], name: &str) -> Option<usize> {
    stages
        .iter()
        .position(|s| s.name.as_deref() == Some(name))
        .or_else(|| name.parse().ok())
}

fn replay(ctx: &Context, stages: Vec<Stage>) -> Replay {
    let mut states: Vec<State> = Vec::new();
    let mut builds = Vec::new();
    let mut problems = Vec::new();
    for (index, stage) in stages.iter().enumerate() {
        let mut state = match stage_index(&stages[..index], &stage.base) {
            Some(parent) => states[parent].clone(),
            None => State {
                workdir: "/".into(),
                ..State::default()
            },
        };
        let label = stage.name.clone().unwrap_or_else(|| format!("#{index}"));
        for (line, instruction) in &stage.instructions {
            let at = format!("stage {label}, line {line}");
            match instruction {
                Instruction::Workdir(dir) => state.workdir = absolute(&state.workdir, dir),
                Instruction::Copy {
                    from: None,
                    sources,
                    dest,
                } => state.ops.push(Op::Context {
                    sources: sources.clone(),
                    dest: absolute(&state.workdir, dest),
                    into: copies_into(dest, sources.len()),
                }),
                Instruction::Copy {
                    from: Some(from),
                    sources,
                    dest,
                } => {
                    let Some(source_stage) = stage_index(&stages[..index], from) else {
                        problems.push(format!("{at}: COPY --from={from}: no earlier such stage"));
                        continue;
                    };
                    let into = copies_into(dest, sources.len());
                    let dest = absolute(&state.workdir, dest);
                    for source in sources {
                        let source = absolute("/", source);
                        let target = copy_target(&dest, &source, into);
                        let from_state = &states[source_stage];
                        if from_state.recipe.as_deref() == Some(source.as_str()) {
                            state.recipe = Some(target.clone());
                        }
                        if from_state.outputs.contains(&source) {
                            state.outputs.insert(target);
                        } else if state.recipe.as_deref() != Some(target.as_str()) {
                            problems.push(format!(
                                "{at}: COPY --from={from} {source}: stage {from} neither builds it \
                                 nor prepares it as a recipe"
                            ));
                        }
                    }
                }
                Instruction::Run(command) => {
                    let words = shell_words(command);
                    for cmd in words.split(|w| matches!(w.as_str(), "&&" | "||" | ";" | "|")) {
                        // Skip VAR=value prefixes.
                        let cmd: Vec<String> = cmd
                            .iter()
                            .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                            .cloned()
                            .collect();
                        let place = Place {
                            stage: index,
                            line: *line,
                            at: &at,
                        };
                        run_command(ctx, &mut state, &place, &cmd, &mut builds, &mut problems);
                    }
                }
                _ => {}
            }
        }
        states.push(state);
    }
    Replay {
        stages,
        states,
        builds,
        problems,
    }
}

/// Where a command runs: its stage, its line, and both as words for messages.
struct Place<'a> {
    stage: usize,
    line: usize,
    at: &'a str,
}

fn run_command(
    ctx: &Context,
    state: &mut State,
    place: &Place,
    cmd: &[String],
    builds: &mut Vec<Build>,
    problems: &mut Vec<String>,
) {
    let Place { stage, line, at } = *place;
    let Some(program) = cmd.first() else {
        return;
    };
    // Redirections write a file, whatever the program.
    for pair in cmd.windows(2) {
        if pair[0] == ">" || pair[0] == ">>" {
            state.ops.push(Op::Stub(absolute(&state.workdir, &pair[1])));
        }
    }
    let args: Vec<&String> = cmd[1..]
        .iter()
        .take_while(|w| *w != ">" && *w != ">>")
        .filter(|w| !w.starts_with('-'))
        .collect();
    match program.as_str() {
        "touch" => {
            // Touching a file that is there changes only its time.
            for a in args {
                let path = absolute(&state.workdir, a);
                if ctx.presence(&state.ops, &path) == Presence::Absent {
                    state.ops.push(Op::Stub(path));
                }
            }
        }
        "rm" => {
            for a in args {
                state.ops.push(Op::Remove(absolute(&state.workdir, a)));
            }
        }
        "cp" if args.len() >= 2 => {
            let (dest, sources) = args.split_last().unwrap();
            for source in sources {
                let source = absolute(&state.workdir, source);
                if state.outputs.contains(&source) {
                    let target = copy_target(
                        &absolute(&state.workdir, dest),
                        &source,
                        copies_into(dest, sources.len()),
                    );
                    state.outputs.insert(target);
                }
            }
        }
        "cargo" => {
            let sub: Vec<&str> = cmd[1..]
                .iter()
                .filter(|w| !w.starts_with('-') && !w.starts_with('+'))
                .map(String::as_str)
                .take(2)
                .collect();
            let recipe = || {
                absolute(
                    &state.workdir,
                    &option_value(cmd, "--recipe-path").unwrap_or("recipe.json".into()),
                )
            };
            match sub.as_slice() {
                ["chef", "prepare", ..] => {
                    let missing = ctx.missing(state, ctx.needs.sources.iter(), true);
                    if missing.is_empty() {
                        let path = recipe();
                        state.recipe = Some(path.clone());
                        state.outputs.insert(path);
                    } else {
                        problems.push(format!(
                            "{at}: `cargo chef prepare` cannot record every target: these files \
                             are not in the stage: {missing:?}"
                        ));
                    }
                }
                ["chef", "cook", ..] => {
                    if state.recipe.as_deref() != Some(recipe().as_str()) {
                        problems.push(format!(
                            "{at}: `cargo chef cook` reads {}, which no complete `cargo chef \
                             prepare` made and no COPY --from brought here",
                            recipe()
                        ));
                    }
                    // The point of the cooked layer: it depends on the recipe alone, so it is
                    // reused until the dependencies change.
                    if state.ops.iter().any(|op| matches!(op, Op::Context { .. })) {
                        problems.push(format!(
                            "{at}: `cargo chef cook` runs after a COPY from the build context, so \
                             its layer is rebuilt on every source change"
                        ));
                    }
                    state.cook = Some((line, cargo_flags(&state.workdir, cmd)));
                }
                ["build", ..] => {
                    let flags = cargo_flags(&state.workdir, cmd);
                    let real_script = ctx.needs.build_script.as_ref().is_some_and(|s| {
                        ctx.presence(&state.ops, &absolute(&state.workdir, s)) == Presence::Real
                    });
                    let mut any = ctx.needs.manifest.clone();
                    if real_script {
                        any.extend(ctx.needs.build_inputs.iter().cloned());
                    }
                    let missing = ctx.missing(state, any.iter(), false);
                    let not_real = ctx.missing(state, ctx.needs.sources.iter(), true);
                    let dir = if flags.profile == "dev" {
                        "debug"
                    } else {
                        flags.profile.as_str()
                    };
                    for bin in &flags.bins {
                        state.outputs.insert(format!(
                            "{}/target/{dir}/{bin}",
                            flags.workdir.trim_end_matches('/')
                        ));
                    }
                    builds.push(Build {
                        stage,
                        line,
                        flags,
                        missing,
                        not_real,
                    });
                }
                _ => {}
            }
        }
        _ => {}
    }
}

// ------------------------------------------------------------------ the checks

/// The chart's default ports and the uid its containers run as.
struct Chart {
    grpc: u16,
    http: u16,
    admin: u16,
    uid: u32,
}

fn chart(root: &Path) -> Chart {
    let text = std::fs::read_to_string(root.join("helm/quotad/values.yaml")).expect("values.yaml");
    let values: serde_norway::Value = serde_norway::from_str(&text).expect("values.yaml parses");
    let port = |name: &str| {
        values["ports"][name]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("values.yaml ports.{name}"))
    };
    let helpers = std::fs::read_to_string(root.join("helm/quotad/templates/_helpers.tpl"))
        .expect("_helpers.tpl");
    let block = helpers
        .split("define \"quotad.containerSecurityContext\"")
        .nth(1)
        .expect("the chart's container securityContext");
    let uid = block
        .lines()
        .find_map(|l| l.trim().strip_prefix("runAsUser:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("runAsUser in the container securityContext");
    Chart {
        grpc: port("grpc"),
        http: port("http"),
        admin: port("admin"),
        uid,
    }
}

/// The Debian release an image is built on, from its name.
fn debian_release(image: &str) -> Option<&'static str> {
    [
        ("bullseye", "11"),
        ("debian11", "11"),
        ("bookworm", "12"),
        ("debian12", "12"),
        ("trixie", "13"),
        ("debian13", "13"),
    ]
    .into_iter()
    .find(|(name, _)| image.contains(name))
    .map(|(_, release)| release)
}

/// Every problem found with `dockerfile` (and `dockerignore`) for the crate at `root`.
fn problems(root: &Path, dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let needs = needs(root);
    let ignore = Ignore::parse(dockerignore);
    let ctx = Context {
        root,
        ignore: &ignore,
        needs: &needs,
    };
    let stages = parse_dockerfile(dockerfile);
    if stages.is_empty() {
        return vec!["no FROM".into()];
    }
    let Replay {
        stages,
        states,
        builds,
        mut problems,
    } = replay(&ctx, stages);
    let final_index = stages.len() - 1;
    let final_stage = &stages[final_index];

    // The binaries the image ships, and the builds that made them.
    let mut shipped_from: BTreeMap<String, usize> = BTreeMap::new();
    for (_, instruction) in &final_stage.instructions {
        if let Instruction::Copy {
            from: Some(from),
            sources,
            ..
        } = instruction
            && let Some(s) = stage_index(&stages, from)
        {
            for source in sources {
                let name = basename(source).to_owned();
                if needs.bins.contains(&name) {
                    shipped_from.insert(name, s);
                }
            }
        }
    }
    for bin in &needs.bins {
        if !shipped_from.contains_key(bin) {
            problems.push(format!(
                "the final stage does not copy the binary {bin} (a [[bin]] of Cargo.toml)"
            ));
        }
    }
    let final_builds: BTreeSet<(usize, usize)> = shipped_from
        .values()
        .filter_map(|&s| builds.iter().rfind(|b| stages_chain(&stages, s, b.stage)))
        .map(|b| (b.stage, b.line))
        .collect();
    for build in &builds {
        let at = format!(
            "`cargo build` at line {} (stage {})",
            build.line,
            stages[build.stage].name.clone().unwrap_or_default()
        );
        if !build.missing.is_empty() {
            problems.push(format!(
                "{at} runs without {:?}: cargo stops with \"can't find … at …\" for a declared \
                 target, or cannot read the manifest",
                build.missing
            ));
        }
        if !final_builds.contains(&(build.stage, build.line)) {
            continue;
        }
        if !build.not_real.is_empty() {
            problems.push(format!(
                "{at} builds the shipped binaries without the real {:?}",
                build.not_real
            ));
        }
        if !build.flags.locked {
            problems.push(format!(
                "{at}: needs --locked (the image must build Cargo.lock's versions)"
            ));
        }
        if build.flags.profile != "release" {
            problems.push(format!(
                "{at}: the image ships a {} build, want --release",
                build.flags.profile
            ));
        }
        if build.flags.bins != needs.bins {
            problems.push(format!(
                "{at} builds {:?}, but Cargo.toml declares {:?}",
                build.flags.bins, needs.bins
            ));
        }
        if let Some((cook_line, cook)) = &states[build.stage].cook
            && cook != &build.flags
        {
            problems.push(format!(
                "`cargo chef cook` at line {cook_line} ({cook:?}) does not match {at} ({:?}): \
                 the cooked dependencies would not be reused",
                build.flags
            ));
        }
        // The glibc the binaries link against must be the runtime's.
        let built_on = base_image(&stages, build.stage);
        let runs_on = base_image(&stages, final_index);
        match (debian_release(&built_on), debian_release(&runs_on)) {
            (Some(a), Some(b)) if a == b => {}
            (a, b) => problems.push(format!(
                "built on {built_on} (Debian {}) but run on {runs_on} (Debian {}): name the same \
                 Debian release in both, or the binaries may need a newer glibc than the runtime has",
                a.unwrap_or("?"),
                b.unwrap_or("?")
            )),
        }
    }

    // The runtime.
    let mut user = None;
    let mut exposed = BTreeSet::new();
    let mut env = BTreeMap::new();
    let mut entrypoint = Vec::new();
    for (_, instruction) in &final_stage.instructions {
        match instruction {
            Instruction::User(u) => user = Some(u.clone()),
            Instruction::Expose(ports) => exposed.extend(
                ports
                    .iter()
                    .filter_map(|p| p.split('/').next().and_then(|p| p.parse::<u16>().ok())),
            ),
            Instruction::Env(pairs) => env.extend(pairs.iter().cloned()),
            Instruction::Entrypoint(e) => entrypoint = e.clone(),
            _ => {}
        }
    }
    let chart = chart(root);
    match user.as_deref().map(|u| u.split(':').next().unwrap_or(u)) {
        Some(uid) => match uid.parse::<u32>() {
            Ok(0) => problems.push("the image runs as root (USER 0)".into()),
            Ok(n) if n != chart.uid => problems.push(format!(
                "the image runs as uid {n}, the chart's containers as {}",
                chart.uid
            )),
            Ok(_) => {}
            Err(_) => problems.push(format!(
                "USER {uid} is not numeric: Kubernetes cannot check runAsNonRoot against a user name"
            )),
        },
        None => problems.push("the final stage sets no USER: it would run as root".into()),
    }
    let required = BTreeSet::from([chart.grpc, chart.http]);
    let allowed = BTreeSet::from([chart.grpc, chart.http, chart.admin]);
    if !required.is_subset(&exposed) || !exposed.is_subset(&allowed) {
        problems.push(format!(
            "EXPOSE {exposed:?}, but the chart's ports are grpc {}, http {} (admin {}, optional)",
            chart.grpc, chart.http, chart.admin
        ));
    }
    for (var, port) in [
        ("QUOTAD_LISTEN", chart.grpc),
        ("QUOTAD_HTTP_LISTEN", chart.http),
    ] {
        let value = env.get(var).cloned().unwrap_or_default();
        if !value.ends_with(&format!(":{port}")) {
            problems.push(format!(
                "ENV {var}={value:?}, want port {port} as in the chart"
            ));
        }
    }
    let program = entrypoint.first().map(|p| basename(p).to_owned());
    if program
        .as_ref()
        .is_none_or(|p| !shipped_from.contains_key(p))
    {
        problems.push(format!("ENTRYPOINT {entrypoint:?} is not a shipped binary"));
    }
    problems
}

/// Is stage `index` built on stage `ancestor` (or the same)?
fn stages_chain(stages: &[Stage], mut index: usize, ancestor: usize) -> bool {
    loop {
        if index == ancestor {
            return true;
        }
        match stage_index(&stages[..index], &stages[index].base) {
            Some(parent) => index = parent,
            None => return false,
        }
    }
}

/// The image a stage ultimately starts from.
fn base_image(stages: &[Stage], mut index: usize) -> String {
    while let Some(parent) = stage_index(&stages[..index], &stages[index].base) {
        index = parent;
    }
    stages[index].base.clone()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(crate_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_dockerfile_builds_every_target_cargo_needs_and_ships_both_binaries() {
    let found = problems(crate_root(), &read("Dockerfile"), &read(".dockerignore"));
    assert!(
        found.is_empty(),
        "Dockerfile problems:\n- {}",
        found.join("\n- ")
    );
}

// ------------------------------------------------------------------ the checker's own tests

/// The Dockerfile before cargo-chef: stubs written by hand for two of the four benches.
const HAND_WRITTEN_STUBS: &str = r#"
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src/bin benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/quotactl.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/decisions.rs \
    && echo 'fn main() {}' > benches/outage.rs \
    && cargo build --locked --release --bin quotad --bin quotactl \
    && rm -rf src benches
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs src/bin/quotactl.rs \
    && cargo build --locked --release --bin quotad --bin quotactl \
    && cp target/release/quotad target/release/quotactl /usr/local/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/quotad /usr/local/bin/quotactl /usr/local/bin/
ENV QUOTAD_LOG_FORMAT=json \
    QUOTAD_LISTEN=0.0.0.0:50051 \
    QUOTAD_HTTP_LISTEN=0.0.0.0:9090
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["quotad"]
CMD ["serve"]
"#;

fn declared_benches() -> Vec<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    manifest["bench"]
        .as_array()
        .map(|b| {
            b.iter()
                .map(|b| format!("benches/{}.rs", b["name"].as_str().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn hand_written_stubs_that_miss_a_declared_bench_are_refused() {
    let found = problems(crate_root(), HAND_WRITTEN_STUBS, "target/\n.git/\n");
    let stubbed = ["benches/decisions.rs", "benches/outage.rs"];
    let unstubbed: Vec<String> = declared_benches()
        .into_iter()
        .filter(|b| !stubbed.contains(&b.as_str()))
        .collect();
    assert!(
        !unstubbed.is_empty(),
        "Cargo.toml declares only the stubbed benches"
    );
    let text = found.join("\n");
    for bench in &unstubbed {
        assert!(
            text.contains(bench.as_str()),
            "{bench} not named in:\n{text}"
        );
    }
    // Only the stub step is wrong: once the stubs cover every bench, it passes.
    let fixed = HAND_WRITTEN_STUBS.replace(
        "&& cargo build --locked --release --bin quotad --bin quotactl \\\n    && rm",
        &format!(
            "{} && cargo build --locked --release --bin quotad --bin quotactl \\\n    && rm",
            unstubbed
                .iter()
                .map(|b| format!("&& touch {b} "))
                .collect::<String>()
        ),
    );
    let found = problems(crate_root(), &fixed, "target/\n.git/\n");
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_checker_refuses_broken_variants_of_the_dockerfile() {
    let ours = read("Dockerfile");
    let ignore = read(".dockerignore");
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "only src copied for the real build",
            ours.replace(
                "COPY . .\nRUN cargo build",
                "COPY src ./src\nRUN cargo build",
            ),
            ignore.clone(),
            "benches/",
        ),
        (
            "benches left out of the context",
            ours.clone(),
            format!("{ignore}benches/\n"),
            "benches/",
        ),
        (
            "proto left out of the context",
            ours.clone(),
            format!("{ignore}proto\n"),
            "proto/quota/v1/quota.proto",
        ),
        (
            "sources copied before the cook",
            ours.replace(
                "COPY --from=planner /src/recipe.json recipe.json",
                "COPY --from=planner /src/recipe.json recipe.json\nCOPY . .",
            ),
            ignore.clone(),
            "rebuilt on every source change",
        ),
        (
            "cook in debug, build in release",
            ours.replace("cargo chef cook --release", "cargo chef cook"),
            ignore.clone(),
            "does not match",
        ),
        (
            "one binary built and shipped",
            ours.replace("--bin quotad --bin quotactl", "--bin quotad")
                .replace(" /src/target/release/quotactl", ""),
            ignore.clone(),
            "quotactl",
        ),
        (
            "root",
            ours.replace("USER 65532:65532", "USER 0"),
            ignore.clone(),
            "root",
        ),
        (
            "a user name",
            ours.replace("USER 65532:65532", "USER nonroot"),
            ignore.clone(),
            "not numeric",
        ),
        (
            "another port",
            ours.replace("EXPOSE 50051 9090", "EXPOSE 50051 8080"),
            ignore.clone(),
            "EXPOSE",
        ),
        (
            "another Debian",
            ours.replace("cc-debian12", "cc-debian13"),
            ignore.clone(),
            "Debian",
        ),
    ];
    for (name, dockerfile, dockerignore, expect) in cases {
        assert!(
            dockerfile != ours || dockerignore != ignore,
            "{name}: the variant changes nothing"
        );
        let found = problems(crate_root(), &dockerfile, &dockerignore).join("\n");
        assert!(
            found.contains(expect),
            "{name}: expected a problem naming {expect:?}, got:\n{found}"
        );
    }
}

#[test]
fn dockerignore_patterns_match_as_docker_does() {
    let ignore = Ignore::parse("# comment\ntarget/\n**/*.rs.bk\n*.md\n!KEEP.md\n/.git\n");
    for (path, excluded) in [
        ("target/release/quotad", true),
        ("src/x.rs.bk", true),
        ("x.rs.bk", true),
        ("README.md", true),
        ("KEEP.md", false),
        ("docs/README.md", false),
        (".git/HEAD", true),
        ("src/main.rs", false),
        ("targets/x", false),
    ] {
        assert_eq!(ignore.excludes(path), excluded, "{path}");
    }
}

#[test]
fn needs_come_from_the_manifest() {
    let needs = needs(crate_root());
    let root: PathBuf = crate_root().to_path_buf();
    for bench in declared_benches() {
        assert!(needs.manifest.contains(&bench), "{bench}");
        assert!(root.join(&bench).is_file(), "{bench} exists");
    }
    assert!(needs.build_inputs.iter().any(|f| f.starts_with("proto/")));
    assert_eq!(
        needs.bins,
        BTreeSet::from(["quotad".to_owned(), "quotactl".to_owned()])
    );
}
