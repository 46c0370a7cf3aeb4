//! Lesson 11 end to end: `--quick` trains the cascade (a 14×14 base model and two super-resolution models) and
//! unCLIP's three networks, grades them and draws the figures; `--part` runs one half; bad flags are refused with a
//! message.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson11");

#[test]
fn quick_run_trains_both_halves_and_grades_them() {
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join("data/lesson06/pipeline.json").exists() {
        println!("skipped: no shipped lesson 06 pipeline");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_ok(&run_lesson(BIN, &["--quick", "--levels", "0,200", "--out", d]));
    assert_files(
        dir.path(),
        &[
            "cascade_levels.png",
            "cascade_stages.png",
            "variations.png",
            "interpolations.png",
            "metrics.json",
            "results.md",
        ],
    );
    let m = metrics(dir.path());
    let levels: Vec<u64> =
        m["cascade"]["levels"].as_array().unwrap().iter().map(|r| r["level"].as_u64().unwrap()).collect();
    assert_eq!(levels, [0, 200]);
    let contenders = m["cascade"]["contenders"].as_array().unwrap();
    assert_eq!(contenders.len(), 3);
    for c in contenders {
        let (fd, acc) =
            (c["grade"]["frechet_distance"].as_f64().unwrap(), c["grade"]["prompt_accuracy"].as_f64().unwrap());
        assert!(fd >= 0.0 && (0.0..=1.0).contains(&acc), "{c}");
    }
    let v = &m["unclip"]["variations"];
    assert_eq!((v["sources"].as_i64(), v["per_source"].as_i64()), (Some(10), Some(8)));
    assert!((0.0..=1.0).contains(&v["class_kept"].as_f64().unwrap()));
    assert_eq!(m["unclip"]["routes"].as_array().unwrap().len(), 3);
    let results = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    for anchor in ["levels", "contenders", "variations", "routes"] {
        assert!(results.contains(&format!("ANCHOR: {anchor}")), "results.md lacks {anchor}");
    }

    // one half alone writes only its own part
    let half = tempfile::tempdir().unwrap();
    assert_ok(&run_lesson(BIN, &["--quick", "--part", "unclip", "--out", half.path().to_str().unwrap()]));
    let m = metrics(half.path());
    assert!(m.get("cascade").is_none() && m.get("unclip").is_some());
}

#[test]
fn bad_flags_exit_with_a_readable_message() {
    assert_user_error(&run_lesson(BIN, &["--quick", "--levels", "0,x"]), "--levels");
    assert_user_error(&run_lesson(BIN, &["--quick", "--levels", "2000"]), "--levels");
    assert_user_error(&run_lesson(BIN, &["--quick", "--part", "everything"]), "--part");
    assert_user_error(&run_lesson(BIN, &["--quick", "--train-images", "10"]), "--train-images");
}
