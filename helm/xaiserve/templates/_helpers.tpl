{{/* Names */}}
{{- define "xaiserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "xaiserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "xaiserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: common ones, and the selector of one component (gateway, worker, redis). */}}
{{- define "xaiserve.labels" -}}
helm.sh/chart: {{ include "xaiserve.chart" . }}
app.kubernetes.io/name: {{ include "xaiserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xaiserve
{{- end -}}

{{- define "xaiserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xaiserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "xaiserve.componentLabels" -}}
{{ include "xaiserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "xaiserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xaiserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Images */}}
{{- define "xaiserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "xaiserve.workerImage" -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := .Values.worker.image.tag | default (printf "%s%s" (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tagSuffix) -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Secrets and their names */}}
{{- define "xaiserve.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-redis" (include "xaiserve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- default (printf "%s-redis-url" (include "xaiserve.fullname" .)) .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "xaiserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "xaiserve.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "xaiserve.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "xaiserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Checks of value combinations that would otherwise fail only at run time. */}}
{{- define "xaiserve.validate" -}}
{{- if .Values.tls.enabled -}}
{{- if and (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or both tls.cert and tls.key (PEM)" -}}
{{- end -}}
{{- if and .Values.tls.mtls (not .Values.tls.existingSecret) (not .Values.tls.clientCA) -}}
{{- fail "tls.mtls needs the client CA: tls.clientCA (PEM) or ca.crt in tls.existingSecret" -}}
{{- end -}}
{{- else if .Values.tls.mtls -}}
{{- fail "tls.mtls needs tls.enabled" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.tokens) -}}
{{- fail "auth.enabled needs auth.existingSecret or at least one entry in auth.tokens" -}}
{{- end -}}
{{- range .Values.auth.tokens -}}
{{- if or (not .name) (not .token) -}}
{{- fail "every auth.tokens entry needs a name and a token" -}}
{{- end -}}
{{- if lt (len .token) 16 -}}
{{- fail (printf "auth.tokens %s: tokens need at least 16 characters (e.g. openssl rand -hex 32)" .name) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]+$" .name) -}}
{{- fail (printf "auth.tokens %q: names may only hold letters, digits, '.', '_' and '-' (they become Secret keys)" .name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.auth.password (not (regexMatch "^[A-Za-z0-9._~-]+$" .Values.redis.auth.password)) -}}
{{- fail "redis.auth.password may only hold A-Z a-z 0-9 . _ ~ - (it becomes part of the queue URL)" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.enabled=false needs redis.external.url or redis.external.existingSecret" -}}
{{- end -}}
{{- if not (has .Values.modelStore.source (list "image" "volume")) -}}
{{- fail "modelStore.source must be image or volume" -}}
{{- end -}}
{{- if and (eq .Values.modelStore.source "volume") (not .Values.modelStore.volume) -}}
{{- fail "modelStore.source=volume needs modelStore.volume (a volume source, e.g. persistentVolumeClaim)" -}}
{{- end -}}
{{- $grace := 10 -}}{{- /* ServerConfig.grace_s's default */ -}}
{{- if hasKey .Values.config "grace_s" -}}{{- $grace = int (ceil (float64 .Values.config.grace_s)) -}}{{- end -}}
{{- $needed := add (int .Values.gateway.preStopSleepSeconds) $grace (int .Values.gateway.shutdownMarginSeconds) -}}
{{- if gt $needed (int .Values.gateway.terminationGracePeriodSeconds) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%d) must be at least gateway.preStopSleepSeconds + config.grace_s + gateway.shutdownMarginSeconds (%d): streams get their drain notice and end within grace_s after the preStop sleep" (int .Values.gateway.terminationGracePeriodSeconds) $needed) -}}
{{- end -}}
{{- if ge (int .Values.worker.graceSeconds) (int .Values.worker.terminationGracePeriodSeconds) -}}
{{- fail "worker.graceSeconds must be shorter than worker.terminationGracePeriodSeconds (the worker needs time to hand its job back)" -}}
{{- end -}}
{{- if not .Values.worker.methods -}}
{{- fail "worker.methods needs at least one job method (relax, ablation_path)" -}}
{{- end -}}
{{- if not (has .Values.worker.autoscaling.metric (list "cpu" "queue")) -}}
{{- fail "worker.autoscaling.metric must be cpu or queue" -}}
{{- end -}}
{{- end -}}

{{/* Paths inside the pods */}}
{{- define "xaiserve.modelStorePath" -}}
{{- if eq .Values.modelStore.source "volume" -}}{{ .Values.modelStore.mountPath }}{{- else -}}/app/model_store{{- end -}}
{{- end -}}

{{/* Environment shared by gateways and workers: the queue URL, assembled from a Secret. */}}
{{- define "xaiserve.queueEnv" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "xaiserve.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: XAISERVE_QUEUE
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/%d" (include "xaiserve.fullname" .) (int .Values.redis.database) | quote }}
{{- else }}
- name: XAISERVE_QUEUE
  value: {{ printf "redis://%s-redis:6379/%d" (include "xaiserve.fullname" .) (int .Values.redis.database) | quote }}
{{- end }}
{{- else }}
- name: XAISERVE_QUEUE
  valueFrom:
    secretKeyRef:
      name: {{ include "xaiserve.redisSecretName" . }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* Volumes shared by gateways and workers (config, TLS material and tokens: gateways only). */}}
{{- define "xaiserve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: state
  emptyDir: {}
{{- if eq .Values.modelStore.source "volume" }}
- name: models
  {{- toYaml .Values.modelStore.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "xaiserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: state
  mountPath: /var/lib/xaiserve
{{- if eq .Values.modelStore.source "volume" }}
- name: models
  mountPath: {{ .Values.modelStore.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}
