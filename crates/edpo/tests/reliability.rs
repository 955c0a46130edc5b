//! A few trials of each fault `tools/reliability.py` measures at length (the README's
//! Reliability table): two sweeps on one directory, thread and job counts, and corrupted
//! copies of the committed fixtures fed to the commands that read them. Crashes, damaged
//! stages and diverging runs are in `engine.rs`; Slurm's kills in `slurm.rs`.

mod common;

use common::{edpo, root, same_run_files, scratch, smoke_args, smoke_sweep, RUN_FILES};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn two_sweeps_on_one_directory_never_compute_a_run_twice() {
    two_sweeps_on_one_directory(["1", "1"]);
}

/// As above, one of the sweeps running its runs two at a time, each in a process of its own
/// (whose outcomes, busy ones included, it reads back from the processes).
#[test]
fn a_sweep_of_run_processes_beside_another_never_computes_a_run_twice() {
    two_sweeps_on_one_directory(["2", "1"]);
}

/// Two sweeps of the smoke grid on one directory at once, with these `--jobs`: every run
/// computed exactly once, by one of them, with the files of a sweep alone.
fn two_sweeps_on_one_directory(jobs: [&str; 2]) {
    let dir = scratch("reliability", &format!("concurrent-{}", jobs.join("-")));
    let reference = dir.join("reference");
    smoke_sweep(&reference, &[]);
    let shared = dir.join("shared");
    let children: Vec<_> = jobs
        .iter()
        .map(|j| {
            Command::new(env!("CARGO_BIN_EXE_edpo"))
                .args(smoke_args(&shared, &["--jobs", j]))
                .current_dir(root())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    // Which process computed which run, from each one's table.
    let mut computed: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outputs {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 2 && f[0].parse::<usize>().is_ok() {
                if f[2] == "completed" {
                    *computed.entry(f[1].to_string()).or_default() += 1;
                }
                // A run the other process held and finished is done, not a failure; only one
                // still held at the end (`busy`) makes the exit status an error.
                assert!(
                    ["completed", "elsewhere", "skipped", "busy"].contains(&f[2]),
                    "{line}"
                );
                assert!(f[2] != "busy" || !o.status.success(), "{line}");
            }
        }
        // A process that found runs held by the other says so by name.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() || err.contains("which holds it"),
            "{err}"
        );
    }
    assert!(
        computed.values().all(|&n| n == 1),
        "a run was computed twice: {computed:?}"
    );
    assert_eq!(computed.len(), 6, "{computed:?}");
    assert_eq!(
        same_run_files(&reference.join("smoke"), &shared.join("smoke")),
        6
    );
}

#[test]
fn jobs_and_threads_do_not_change_a_number() {
    let dir = scratch("reliability", "threads");
    let wider = [
        "--set",
        "model.n_embd=64",
        "--set",
        "model.n_layer=2",
        "--set",
        "model.n_head=4",
    ];
    let mut roots = Vec::new();
    for (jobs, threads) in [("1", "1"), ("2", "2")] {
        let out = dir.join(format!("j{jobs}-t{threads}"));
        let mut extra = vec!["--jobs", jobs, "--threads", threads];
        extra.extend(wider);
        let o = edpo(
            &smoke_args(&out, &extra)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        roots.push(out.join("smoke"));
    }
    assert_eq!(same_run_files(&roots[0], &roots[1]), 6);
}

/// Truncations and bit flips of the committed fixtures, each fed to the command that reads
/// it: never a panic, and a rejection names the file (`tools/reliability.py` runs hundreds).
#[test]
fn corrupted_fixtures_never_panic() {
    let dir = scratch("reliability", "corrupt");
    let golden = root().join("testdata/golden");
    let mut seed = 0x5EED_u64;
    let mut cases = 0;
    let mut check = |cmd: Vec<String>, name: &str, what: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_edpo"))
            .args(&cmd)
            .current_dir(root())
            .output()
            .expect("run edpo");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && o.status.code().is_some_and(|c| c != 101),
            "{name} {what}: {err}"
        );
        if !o.status.success() {
            assert!(
                err.contains(name),
                "{name} {what}: the error does not name it: {err}"
            );
        }
        cases += 1;
    };
    let mut mutations = |bytes: &[u8]| -> Vec<(String, Vec<u8>)> {
        // A fixed pseudo-random byte and bit (SplitMix64 steps).
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let i = (z as usize) % bytes.len().max(1);
        let mut flipped = bytes.to_vec();
        if let Some(b) = flipped.get_mut(i) {
            *b ^= 1 << (z >> 61);
        }
        vec![
            (
                "truncated to half".into(),
                bytes[..bytes.len() / 2].to_vec(),
            ),
            (format!("byte {i} flipped"), flipped),
        ]
    };
    let pairs = golden.join("pairs.jsonl");
    for arch in ["gpt2", "llama", "qwen2"] {
        let src = golden.join(arch).join("policy");
        for file in ["config.json", "model.safetensors", "tokenizer.json"] {
            for (what, bytes) in mutations(&std::fs::read(src.join(file)).expect("fixture")) {
                let model = dir.join("model");
                let _ = std::fs::remove_dir_all(&model);
                std::fs::create_dir_all(&model).expect("dir");
                for e in std::fs::read_dir(&src).expect("fixture dir").flatten() {
                    std::fs::copy(e.path(), model.join(e.file_name())).expect("copy");
                }
                std::fs::write(model.join(file), bytes).expect("write");
                let cmd: Vec<String> = vec![
                    "score".to_string(),
                    "--policy".to_string(),
                    model.display().to_string(),
                    "--reference".to_string(),
                    golden.join(arch).join("reference").display().to_string(),
                    "--data".to_string(),
                    pairs.display().to_string(),
                    "--beta".to_string(),
                    "0.1".to_string(),
                    "--epsilon".to_string(),
                    "0.01".to_string(),
                ];
                check(cmd, file, &what);
            }
        }
    }
    for (what, bytes) in mutations(&std::fs::read(&pairs).expect("pairs")) {
        let data = dir.join("pairs.jsonl");
        std::fs::write(&data, bytes).expect("write");
        let cmd: Vec<String> = vec![
            "score".to_string(),
            "--policy".to_string(),
            golden.join("gpt2/policy").display().to_string(),
            "--reference".to_string(),
            golden.join("gpt2/reference").display().to_string(),
            "--data".to_string(),
            data.display().to_string(),
            "--beta".to_string(),
            "0.1".to_string(),
            "--epsilon".to_string(),
            "0.01".to_string(),
        ];
        check(cmd, "pairs.jsonl", &what);
    }
    for name in ["tiny-llama-f32.gguf", "tiny-llama-q4_0.gguf"] {
        let src = root().join("testdata/gguf").join(name);
        for (what, bytes) in mutations(&std::fs::read(&src).expect("gguf")) {
            let file = dir.join(name);
            std::fs::write(&file, bytes).expect("write");
            let cmd: Vec<String> = vec![
                "convert".to_string(),
                "--model".to_string(),
                file.display().to_string(),
                "--out".to_string(),
                dir.join("converted").display().to_string(),
            ];
            check(cmd, name, &what);
        }
    }
    for name in ["sentiment.yaml", "default.yaml"] {
        let src = root().join("experiments").join(name);
        for (what, bytes) in mutations(&std::fs::read(&src).expect("experiment")) {
            let exp = dir.join("experiments");
            let _ = std::fs::remove_dir_all(&exp);
            std::fs::create_dir_all(&exp).expect("dir");
            for e in std::fs::read_dir(root().join("experiments"))
                .expect("experiments")
                .flatten()
            {
                std::fs::copy(e.path(), exp.join(e.file_name())).expect("copy");
            }
            std::fs::write(exp.join(name), bytes).expect("write");
            let path = exp.join(name).display().to_string();
            let cmd = if name == "default.yaml" {
                vec!["sweep".to_string(), path, "--dry-run".into()]
            } else {
                vec!["train".to_string(), path, "--print-config".into()]
            };
            check(cmd, name, &what);
        }
    }
    assert_eq!(cases, 28);
}

/// The output root on a tmpfs that fills mid-sweep (root only: it mounts one; skipped with a
/// message otherwise): the sweep fails naming a path and the cause, nothing left looks
/// complete when it is not, and once the space is grown a resume finishes with run files
/// byte-identical to a sweep that never ran out.
#[test]
fn a_full_disk_fails_by_name_and_the_resume_finishes() {
    let uid = Command::new("id").arg("-u").output().expect("id");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIPPED a_full_disk_fails_by_name_and_the_resume_finishes: mounting a tmpfs needs root");
        return;
    }
    let dir = scratch("reliability", "disk");
    let reference = dir.join("reference");
    smoke_sweep(&reference, &[]);
    let used = |d: &Path| -> u64 {
        let o = Command::new("du")
            .args(["-s", "-B1"])
            .arg(d)
            .output()
            .expect("du");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("du output")
    };
    // Room for the stages and half the runs.
    let size = used(&reference.join("cache")) + used(&reference.join("smoke")) / 2;
    let mnt = dir.join("full");
    std::fs::create_dir_all(&mnt).expect("mount point");
    let mount = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={}k", size / 1024),
            "tmpfs",
        ])
        .arg(&mnt)
        .output()
        .expect("mount");
    if !mount.status.success() {
        eprintln!(
            "SKIPPED a_full_disk_fails_by_name_and_the_resume_finishes: mount failed: {}",
            String::from_utf8_lossy(&mount.stderr)
        );
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let args = smoke_args(&mnt, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let full = edpo(&args);
    let err = String::from_utf8_lossy(&full.stderr).into_owned();
    {
        assert!(
            !full.status.success(),
            "the sweep did not notice the full disk"
        );
        assert!(
            err.contains("No space left") && err.contains(mnt.to_str().expect("utf-8")),
            "{err}"
        );
        // A run whose status says completed has all its files, and they are right.
        for e in std::fs::read_dir(mnt.join("smoke/runs"))
            .expect("runs")
            .flatten()
        {
            let status = std::fs::read_to_string(e.path().join("status.json")).unwrap_or_default();
            if status.contains("\"completed\"") {
                for f in RUN_FILES {
                    assert_eq!(
                        std::fs::read(e.path().join(f)).ok(),
                        std::fs::read(reference.join("smoke/runs").join(e.file_name()).join(f))
                            .ok(),
                        "{f} of a completed run"
                    );
                }
            }
        }
        let grown = Command::new("mount")
            .args([
                "-o",
                &format!("remount,size={}k", 4 * used(&reference) / 1024 + 1024),
            ])
            .arg(&mnt)
            .status()
            .expect("remount");
        assert!(grown.success());
        let resumed = edpo(&args);
        assert!(
            resumed.status.success(),
            "{}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert_eq!(
            same_run_files(&reference.join("smoke"), &mnt.join("smoke")),
            6
        );
    }
}

/// Unmounts a tmpfs when dropped, whatever the checks did (a failed assertion included).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A non-finite loss, gradient norm or parameter injected at optimizer step 2 of one run of
/// the smoke grid (`EDPO_FAULT_NONFINITE=TARGET@2@HASH`) fails that run alone, with the step
/// and what went non-finite in its `status.json`; the other five complete byte-identical to
/// an undisturbed sweep, and the sweep exits non-zero naming the run.
#[test]
fn an_injected_nonfinite_value_fails_its_run_alone() {
    let dir = scratch("reliability", "nonfinite");
    let reference = dir.join("reference");
    smoke_sweep(&reference, &[]);
    let plan = edpo(&["sweep", "experiments/smoke.yaml", "--dry-run"]);
    let hashes: Vec<String> = String::from_utf8_lossy(&plan.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 1 && f[0].parse::<usize>().is_ok() && f[1].len() == 12)
                .then(|| f[1].to_string())
        })
        .collect();
    assert_eq!(hashes.len(), 6);
    for (i, (target, what)) in [
        ("loss", "loss"),
        ("gradient", "gradient norm"),
        ("parameter", "parameter"),
    ]
    .into_iter()
    .enumerate()
    {
        let victim = &hashes[2 * i];
        let out = dir.join(target);
        let o = Command::new(env!("CARGO_BIN_EXE_edpo"))
            .args(smoke_args(&out, &[]))
            .current_dir(root())
            .env("EDPO_FAULT_NONFINITE", format!("{target}@2@{victim}"))
            .output()
            .expect("run edpo");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{target}: the sweep must fail");
        assert!(
            err.contains("1 of 6 runs failed") && err.contains(victim.as_str()),
            "{err}"
        );
        for h in &hashes {
            let run = out.join("smoke/runs").join(h);
            let status = std::fs::read_to_string(run.join("status.json")).expect("status");
            if h == victim {
                assert!(
                    status.contains("\"failed\"")
                        && status.contains(&format!("non-finite {what} at optimizer step 2")),
                    "{status}"
                );
            } else {
                assert!(status.contains("\"completed\""), "{status}");
                for f in RUN_FILES {
                    assert_eq!(
                        std::fs::read(run.join(f)).ok(),
                        std::fs::read(reference.join("smoke/runs").join(h).join(f)).ok(),
                        "{target}: {f} of run {h}"
                    );
                }
            }
        }
    }
}
