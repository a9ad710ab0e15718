//! Each static release binary runs in an empty root: a directory holding
//! only the binary, as in a `FROM scratch` image.

mod common;

use std::fs;
use std::path::Path;

/// Every binary the crate ships. Keep in step with src/bin and the Makefile.
const BINARIES: &[&str] = &[
    "apiserver-proxy-sidecar",
    "apiserver-proxy-pod-webhook",
    "proxy-server",
    "proxy-agent",
    "proxy-test-client",
    "http-test-server",
];

fn empty_root_with(binary: &Path) -> tempdir::Root {
    let root = tempdir::Root::new();
    fs::copy(binary, root.path().join("bin")).expect("copy binary into the empty root");
    root
}

#[test]
fn every_binary_is_static_and_prints_help_in_an_empty_root() {
    let dir = common::release_dir();
    for name in BINARIES {
        let binary = dir.join(name);
        assert!(binary.is_file(), "{} is missing", binary.display());
        let described = common::run_ok("file", &[binary.to_str().unwrap()]);
        assert!(
            described.contains("statically linked"),
            "{name} is not static: {described}"
        );
        let root = empty_root_with(&binary);
        let out = common::run("chroot", &[root.path().to_str().unwrap(), "/bin", "--help"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} --help failed in an empty root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("Usage:"),
            "{name} --help printed no usage: {stdout}"
        );
    }
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A temporary directory removed on drop.
    pub struct Root(PathBuf);

    impl Root {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(super::common::unique("scratch-root-"));
            std::fs::create_dir_all(&path).expect("create temp root");
            Root(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
