//! Link-time set-up: bake the libtorch library directory into every binary's rpath, so that
//! `cargo run --release --bin lessonNN` and `./target/release/lessonNN` work without LD_LIBRARY_PATH.
//! torch-sys exports the directory it linked against as `DEP_TCH_LIBTORCH_LIB` (its `links = "tch"`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
}
