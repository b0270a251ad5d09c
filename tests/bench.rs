//! `herald bench --quick` end to end: it runs, every accepted event is
//! delivered (the bench fails otherwise), and the table carries the figures.
//! Timings are not asserted: speed is measured, not tested.

use std::process::Command;

#[test]
fn quick_bench_delivers_everything_and_prints_its_table() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("herald bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let figures = report["figures"].as_array().expect("figures");
    let find = |scenario: &str, figure: &str| {
        figures
            .iter()
            .find(|f| {
                f["scenario"].as_str().unwrap().starts_with(scenario) && f["figure"] == figure
            })
            .and_then(|f| f["value"].as_f64())
            .unwrap_or_else(|| panic!("no figure {scenario:?} / {figure:?}"))
    };
    assert!(find("ceiling", "requests/s") > 0.0);
    assert!(find("fsync", "fsync per 256") > 0.0);
    for scenario in ["end to end, batches", "end to end, single"] {
        assert_eq!(find(scenario, "events"), 5000.0, "{scenario}");
        assert!(find(scenario, "delivered/s") > 0.0, "{scenario}");
        assert!(find(scenario, "ceiling right before") > 0.0, "{scenario}");
        assert!(find(scenario, "ceiling right after") > 0.0, "{scenario}");
        assert!(find(scenario, "delivered/s ÷ ceiling") > 0.0, "{scenario}");
    }
    assert_eq!(find("outage", "events accepted while down"), 10_000.0);
    assert!(find("throttled", "critical events") >= 20.0);
    assert!(
        find("throttled", "critical end-to-end max")
            >= find("throttled", "critical end-to-end p99")
    );
}
