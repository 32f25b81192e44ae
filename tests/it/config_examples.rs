//! Every example under config/ parses and validates.

use switchyard::config::Config;

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        // Examples name their secrets as ${VAR}: give every one a value.
        let text = std::fs::read_to_string(&path).unwrap();
        for var in text.split("${").skip(1).filter_map(|s| s.split('}').next()) {
            std::env::set_var(var, "example-secret");
        }
        Config::load(&path).unwrap_or_else(|e| panic!("{}: {}", path.display(), e.report()));
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no example configs found in {}",
        dir.display()
    );
}
