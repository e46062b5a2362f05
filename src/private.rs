//! Files and folders only their owner may read (secrets, the callback queue, the demo's
//! folder): mode 0600 / 0700 on Unix. Elsewhere the platform's default access rules apply
//! (on Windows, the folder's ACL), so nothing outside this module names a Unix-only API.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Open options that create a file with mode 0600 on Unix.
pub fn file_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

/// Makes an existing file its owner's only (a reused file keeps its old mode otherwise).
pub fn restrict(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

/// Creates `dir` and its parents, the last with mode 0700 on Unix.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    #[allow(unused_mut)]
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}
