"""securesystemslib: signers and keys are looked up by scheme and key type at run time;
list the signer modules so verification works frozen. Cloud KMS, GPG and hardware-key
signers need packages outpost does not ship."""

from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules(
    "securesystemslib.signer",
    filter=lambda name: not any(s in name for s in ("_gcp", "_aws", "_azure", "_vault",
                                                     "_hsm", "_gpg", "_sigstore")))
