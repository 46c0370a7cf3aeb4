//! Lesson 07 end to end: `--quick`, on a UNet that lesson 04 trains for two steps and the lesson 06 pipeline in
//! data/lesson06, writes its figures, tables and metrics, with every ODE solver's fitted order within ±0.15 of theory
//! and every sampler inside its NFE budget; a missing UNet and bad flags exit with a one-line message.
mod common;
use common::*;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_lesson07");
const LESSON04: &str = env!("CARGO_BIN_EXE_lesson04");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quick_run_writes_outputs_and_the_orders_match_theory() {
    let dir = tempfile::tempdir().unwrap();
    let (l04, out) = (dir.path().join("lesson04"), dir.path().join("lesson07"));
    let tiny = ["--quick", "--steps", "2", "--num-samples", "2", "--sample-steps", "2", "--out", s(&l04)];
    assert_ok(&run_lesson(LESSON04, &tiny));
    assert_ok(&run_lesson(BIN, &["--quick", "--unet", s(&l04.join("unet.safetensors")), "--out", s(&out)]));
    assert_files(
        &out,
        &[
            "order.png",
            "trajectories.png",
            "fd_vs_nfe.png",
            "samples_by_sampler.png",
            "prompt_accuracy_vs_nfe.png",
            "results.md",
            "metrics.json",
            "run.json",
        ],
    );
    let m = metrics(&out);
    let solvers = m["order_study"]["solvers"].as_array().unwrap();
    assert_eq!(solvers.len(), 7);
    for r in solvers {
        let (order, expected) = (r["order"].as_f64().unwrap(), r["expected"].as_f64().unwrap());
        assert!((order - expected).abs() <= 0.15, "{}: fitted order {order}, theory {expected}", r["name"]);
    }
    // 9 samplers × the quick budgets 5 and 10, each within its budget, graded
    let rows = m["nfe_study"]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 18);
    for r in rows {
        assert!(r["nfe"].as_u64().unwrap() <= r["budget"].as_u64().unwrap(), "{r}");
        assert!(r["grade"]["frechet_distance"].as_f64().unwrap().is_finite(), "{r}");
    }
    let reference = &m["nfe_study"]["reference"];
    assert_eq!((reference["sampler"].as_str(), reference["nfe"].as_u64()), (Some("ddpm"), Some(100)));
    let text = m["text_to_image"]["rows"].as_array().unwrap();
    assert_eq!(text.len(), 3); // --quick: budget 5 only
    assert!(text.iter().all(|r| (0.0..=1.0).contains(&r["grade"]["overall"].as_f64().unwrap())));
    assert_eq!(m["trajectories"]["panels"].as_array().unwrap().len(), 4);
    assert_eq!(m["bits_per_dim"]["per_image"].as_array().unwrap().len(), 2);
    // the variational bound of the same model on the same 2 images: T = 1000 evaluations each, β̃ and β
    let vlb = &m["vlb_bits_per_dim"];
    assert_eq!((vlb["images"].as_i64(), vlb["nfe"].as_u64()), (Some(2), Some(1000)));
    for b in vlb["bounds"].as_array().unwrap() {
        let (mean, terms) =
            (b["mean"].as_f64().unwrap(), ["prior", "steps", "decoder"].map(|k| b[k].as_f64().unwrap()));
        assert!(mean > 0.0 && (terms.iter().sum::<f64>() - mean).abs() < 1e-9, "{b}");
    }
    let results = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(results.contains("<!-- ANCHOR: nfe -->\n| sampler |"), "{results}");
    assert!(results.contains("| DPM-Solver++(2M) | DPM++ 2M Karras |"), "{results}");
    assert!(results.contains("<!-- ANCHOR: prompt_accuracy -->"), "{results}");
    assert!(results.contains("| variational bound, σ² = β̃ ([DDPM] eq. 5) |"), "{results}");
}

#[test]
fn a_missing_unet_and_bad_flags_exit_with_a_readable_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = run_lesson(BIN, &["--quick", "--unet", "/nonexistent/unet.safetensors", "--out", s(dir.path())]);
    assert_user_error(&missing, "no lesson 04 UNet at /nonexistent/unet.safetensors");
    assert_user_error(&missing, "`./run.sh lesson 04 --ship`, or pass --unet PATH");
    assert_eq!(String::from_utf8_lossy(&missing.stderr).trim().lines().count(), 1, "one line");
    assert_user_error(&run_lesson(BIN, &["--nfe", "5,0"]), "--nfe");
    assert_user_error(&run_lesson(BIN, &["--num-samples", "1"]), "--num-samples");
    assert_user_error(&run_lesson(BIN, &["--clamp", "maybe"]), "--clamp");
}
