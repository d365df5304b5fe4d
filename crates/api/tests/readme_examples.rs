//! Every manifest in the README parses and validates: the examples users
//! copy are checked like any manifest they write.

#[test]
fn readme_manifests_are_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("read README.md");
    let mut checked = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let body = &rest[start + "```yaml\n".len()..];
        let end = body.find("```").expect("closed yaml block");
        let block = &body[..end];
        rest = &body[end + 3..];
        if !block.contains("apiVersion: yunbian.io/v1") {
            continue;
        }
        if let Err(e) = yunbian_api::parse_manifests(block) {
            panic!("README manifest does not validate: {e}\n{block}");
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} manifests found in the README");
}
