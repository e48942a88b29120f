//! The manifests under config/ patch Knative's own objects: every object, namespace, container
//! and ConfigMap key they name must exist in Knative's stock manifests
//! (`shared/fixtures/knative`, beside the repository), and new objects must be of a kind whose
//! CRD serves their version.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures() -> PathBuf {
    let p = repo().join("../shared/fixtures/knative");
    assert!(
        p.is_dir(),
        "Knative's stock manifests are expected at {} (shared/ beside the repository)",
        p.display()
    );
    p
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(yaml_files(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    out
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[*k]).as_str().unwrap_or("")
}

fn container_names(v: &Value) -> Vec<String> {
    v["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .map(|cs| cs.iter().map(|c| s(c, &["name"]).to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn every_patch_names_objects_that_knative_ships() {
    let stock: Vec<Value> = yaml_files(&fixtures())
        .iter()
        .flat_map(|p| docs(p))
        .collect();
    let ours: Vec<(PathBuf, Value)> = ["serving", "eventing"]
        .iter()
        .flat_map(|d| yaml_files(&repo().join("config").join(d)))
        .flat_map(|p| docs(&p).into_iter().map(move |v| (p.clone(), v)))
        .collect();
    assert!(
        ours.len() >= 5,
        "expected the swap manifests, found {}",
        ours.len()
    );
    for (path, doc) in &ours {
        let (kind, name, ns) = (
            s(doc, &["kind"]),
            s(doc, &["metadata", "name"]),
            s(doc, &["metadata", "namespace"]),
        );
        let what = format!("{}: {kind} {ns}/{name}", path.display());
        if kind == "ContainerSource" {
            // A new object: its CRD must serve the version we use.
            let version = s(doc, &["apiVersion"])
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_owned();
            let served = stock.iter().any(|c| {
                s(c, &["kind"]) == "CustomResourceDefinition"
                    && s(c, &["spec", "names", "kind"]) == "ContainerSource"
                    && c["spec"]["versions"].as_sequence().is_some_and(|vs| {
                        vs.iter().any(|v| {
                            s(v, &["name"]) == version && v["served"].as_bool() == Some(true)
                        })
                    })
            });
            assert!(served, "{what}: no served CRD version {version}");
            continue;
        }
        let target = stock
            .iter()
            .find(|v| {
                s(v, &["kind"]) == kind
                    && s(v, &["metadata", "name"]) == name
                    && s(v, &["metadata", "namespace"]) == ns
            })
            .unwrap_or_else(|| panic!("{what}: Knative ships no such object"));
        match kind {
            "Deployment" => {
                let stock_names = container_names(target);
                for c in container_names(doc) {
                    assert!(
                        stock_names.contains(&c),
                        "{what}: container {c:?} is not one of {stock_names:?}"
                    );
                }
            }
            "ConfigMap" => {
                for key in doc["data"].as_mapping().expect("data").keys() {
                    let key = key.as_str().unwrap_or("");
                    assert!(
                        target["data"].get(key).is_some(),
                        "{what}: Knative's ConfigMap has no key {key:?}"
                    );
                }
            }
            "Image" => assert!(!s(doc, &["spec", "image"]).is_empty(), "{what}: no image"),
            other => panic!("{what}: unexpected kind {other}"),
        }
    }
}
