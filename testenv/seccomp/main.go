// Command seccomp prints the Localhost seccomp profile of Tripod's buildd
// containers: containerd's RuntimeDefault profile (for a container with the
// runtime's default capabilities) plus the system calls buildah needs to
// run RUN steps in a user namespace of its own without CAP_SYS_ADMIN.
//
//	cd testenv/seccomp && go run . > ../../charts/tripod/files/buildd-seccomp.json
package main

import (
	"encoding/json"
	"os"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// The default capabilities of a containerd container.
var defaultCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
	"CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
	"CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}

// What buildah (run as root without CAP_SYS_ADMIN) does to build: create a
// user and mount namespace, mount in it, pivot into the build root.
var userns = []string{
	"clone", "clone3", "unshare", "setns", "mount", "umount2", "pivot_root",
	"mount_setattr", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
	"fspick", "keyctl",
}

func main() {
	spec := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{
		Bounding: defaultCaps, Effective: defaultCaps, Permitted: defaultCaps,
	}}}
	p := seccomp.DefaultProfile(spec)
	wanted := map[string]bool{}
	for _, n := range userns {
		wanted[n] = true
	}
	var kept []specs.LinuxSyscall
	for _, s := range p.Syscalls {
		// Drop the rules that restrict these calls (clone by flags, clone3
		// answered with ENOSYS): the rule below allows them outright.
		restricted := false
		for _, n := range s.Names {
			if wanted[n] && (len(s.Args) > 0 || s.Action != specs.ActAllow) {
				restricted = true
			}
		}
		if !restricted {
			kept = append(kept, s)
		}
	}
	kept = append(kept, specs.LinuxSyscall{Names: userns, Action: specs.ActAllow})
	p.Syscalls = kept
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(p); err != nil {
		panic(err)
	}
}
