terraform {
  required_providers {
    google = {
      source = "hashicorp/google"
    }
  }
}

# Reserved before the instances, so each config can advertise its own public address.
resource "google_compute_address" "agent" {
  for_each = toset(var.names)
  name     = "trellis-${each.key}"
  region   = var.region
}

resource "google_compute_firewall" "peer" {
  name        = "trellis-peer"
  network     = var.network
  description = "Trellis peers: QUIC/UDP between agents only; the API stays on loopback"
  direction   = "INGRESS"

  allow {
    protocol = "udp"
    ports    = [tostring(var.peer_port)]
  }

  source_ranges = concat([for n in var.names : "${google_compute_address.agent[n].address}/32"], var.peer_cidrs)
  target_tags   = ["trellis-agent"]
}

resource "google_compute_instance" "agent" {
  for_each     = toset(var.names)
  name         = "trellis-${each.key}"
  machine_type = var.machine_type
  zone         = var.zone
  tags         = ["trellis-agent"]

  boot_disk {
    initialize_params {
      # Ubuntu images run cloud-init on the `user-data` metadata key.
      image = "ubuntu-os-cloud/ubuntu-2404-lts-amd64"
    }
  }

  network_interface {
    network = var.network
    access_config {
      nat_ip = google_compute_address.agent[each.key].address
    }
  }

  metadata = {
    user-data = templatefile("${path.module}/../../templates/user-data.yaml.tftpl", {
      name           = each.key
      advertise      = google_compute_address.agent[each.key].address
      peer_port      = var.peer_port
      join           = jsonencode(var.seeds)
      cloud          = "gcp"
      region         = var.region
      zone           = var.zone
      unit_b64       = filebase64(var.unit_path)
      ca_b64         = filebase64("${var.tls_root}/${each.key}/ca.pem")
      cert_b64       = filebase64("${var.tls_root}/${each.key}/node.pem")
      key_b64        = filebase64("${var.tls_root}/${each.key}/node.key")
      trellis_url    = var.trellis_url
      trellis_sha256 = var.trellis_sha256
    })
    block-project-ssh-keys = "true"
  }

  shielded_instance_config {
    enable_secure_boot = true
  }
}
