//! buildd's storage driver: with `auto` (the default) it takes overlay
//! where it may mount one and vfs where it may not, and says why. Runs the
//! host's buildah as root, once as it is and once without CAP_SYS_ADMIN
//! (through `capsh`), as in a build Pod with the runtime's default
//! capabilities.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tripod::buildd::buildah::StorageDriver;

fn capsh() -> &'static str {
    ["/usr/sbin/capsh", "/sbin/capsh"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("capsh (apt-get install libcap2-bin)")
}

#[tokio::test]
async fn auto_takes_overlay_where_buildd_may_mount_and_vfs_where_not() {
    let dir = std::env::temp_dir().join(format!("tripod-storage-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("storage");
    std::fs::create_dir_all(&root).unwrap();

    let (driver, why) = StorageDriver::Auto
        .resolve(Path::new("buildah"), &root)
        .await;
    assert_eq!(driver, "overlay", "{why}");

    // buildah without the capability to mount.
    let wrapper = dir.join("buildah-no-sys-admin");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --drop=cap_sys_admin -- -c 'exec buildah \"$@\"' buildah \"$@\"\n",
            capsh()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (driver, why) = StorageDriver::Auto.resolve(&wrapper, &root).await;
    assert_eq!(driver, "vfs", "{why}");
    assert!(why.contains("operation not permitted"), "{why}");

    // Set explicitly, no probe; and the probe leaves nothing behind.
    let (driver, _) = StorageDriver::Vfs.resolve(&wrapper, &root).await;
    assert_eq!(driver, "vfs");
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
