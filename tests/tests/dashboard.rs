//! The Grafana dashboard in deploy/ is valid dashboard JSON (the fields Grafana's schema
//! requires, unique panel ids, a layout) and queries only families the daemon exports (the L7
//! suite checks that a daemon under traffic emits each of them).

use std::collections::HashSet;

use nodemesh_tests::families_in;

#[test]
fn dashboard_is_grafana_json_and_uses_exported_families() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("deploy/grafana/nodemesh-node.json"))
        .expect("deploy/grafana/nodemesh-node.json");
    let d: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    for key in [
        "uid",
        "title",
        "schemaVersion",
        "panels",
        "templating",
        "time",
    ] {
        assert!(d.get(key).is_some(), "dashboard lacks {key}");
    }
    assert!(
        d["schemaVersion"]
            .as_u64()
            .expect("schemaVersion is a number")
            >= 36
    );
    let sources: String = ["metrics.rs", "identity/ca.rs"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(root.join("mesh-daemon/src").join(f)).expect("daemon source")
        })
        .collect();
    let mut ids = HashSet::new();
    let mut queried = 0;
    for p in d["panels"].as_array().expect("panels is a list") {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        assert!(
            p["type"].is_string() && p["title"].is_string(),
            "panel {id}"
        );
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id} gridPos.{k}");
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("a target has an expr");
            for fam in families_in(expr) {
                let base = fam
                    .trim_start_matches("nodemesh_")
                    .trim_end_matches("_bucket")
                    .to_string();
                let exported =
                    base.starts_with("process_") || sources.contains(&format!("\"{base}\""));
                assert!(
                    exported,
                    "panel {id} queries {fam}, which the daemon does not export"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "the dashboard queries the mesh's families");
}
